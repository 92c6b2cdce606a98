"""The daemon assembled: services, control API, desktop API, keeper, status."""
