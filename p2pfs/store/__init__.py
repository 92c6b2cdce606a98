"""The local content-addressed store: chunk files, the SQLite index, quota, fsck."""
