"""The p2pfs command line: one module per command group."""
