"""The volumes as a filesystem: the views, and the pyfuse3 adapter."""
