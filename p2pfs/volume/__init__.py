"""Volumes: the registry, import, the publisher's work tree, commits, pins."""
