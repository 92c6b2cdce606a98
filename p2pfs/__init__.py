"""p2pfs: a peer-to-peer, content-addressed FUSE cache for a desktop estate."""

__version__ = "0.1.0"
