"""Where files are cut: the native FastCDC scan's Python side and its pure twin."""
