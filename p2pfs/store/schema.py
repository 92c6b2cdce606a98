"""The store index's schema: its tables and triggers, and the migrations between versions.

What each table holds is described in ``index.py``. A schema change is a new
version with a migration step here, run in one transaction at open.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from p2pfs.errors import IntegrityError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3


STORED_BYTES = "stored_bytes"

STORED_CHUNKS = "stored_chunks"

PINNED_BYTES = "pinned_bytes"

EVICTIONS = "evictions"


# Version 1: chunks, stats, files.
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    last_access INTEGER NOT NULL,
    pins INTEGER NOT NULL DEFAULT 0,
    source TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stats (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files (
    volume TEXT NOT NULL,
    path BLOB NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    blob_id BLOB NOT NULL,
    PRIMARY KEY (volume, path)
) WITHOUT ROWID;
"""


# Version 1 -> 2: pin sets, intents, the LRU index, the totals and their triggers.
# Version 1 never set chunks.pins, so it starts from zero.
_MIGRATE_V2 = """
UPDATE chunks SET pins = 0;
CREATE TABLE pin_sets (
    set_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created INTEGER NOT NULL
);
CREATE TABLE pinned (
    set_id INTEGER NOT NULL REFERENCES pin_sets (set_id),
    id BLOB NOT NULL,
    PRIMARY KEY (set_id, id)
) WITHOUT ROWID;
CREATE INDEX pinned_by_id ON pinned (id);
CREATE TABLE intents (
    seq INTEGER PRIMARY KEY,
    op TEXT NOT NULL CHECK (op IN ('put', 'evict')),
    id BLOB NOT NULL,
    size INTEGER NOT NULL,
    owner TEXT NOT NULL
);
CREATE INDEX chunks_lru ON chunks (last_access) WHERE pins = 0;
INSERT OR REPLACE INTO stats (name, value) VALUES
    ('stored_chunks', (SELECT count(*) FROM chunks)),
    ('stored_bytes', (SELECT coalesce(sum(size), 0) FROM chunks)),
    ('pinned_bytes', 0);
CREATE TRIGGER chunks_insert AFTER INSERT ON chunks BEGIN
    UPDATE stats SET value = value + 1 WHERE name = 'stored_chunks';
    UPDATE stats SET value = value + new.size WHERE name = 'stored_bytes';
    UPDATE stats SET value = value + new.size WHERE name = 'pinned_bytes' AND new.pins > 0;
    UPDATE chunks SET pins = (SELECT count(*) FROM pinned WHERE pinned.id = new.id)
        WHERE id = new.id AND pins != (SELECT count(*) FROM pinned WHERE pinned.id = new.id);
END;
CREATE TRIGGER chunks_delete AFTER DELETE ON chunks BEGIN
    UPDATE stats SET value = value - 1 WHERE name = 'stored_chunks';
    UPDATE stats SET value = value - old.size WHERE name = 'stored_bytes';
    UPDATE stats SET value = value - old.size WHERE name = 'pinned_bytes' AND old.pins > 0;
END;
CREATE TRIGGER chunks_update AFTER UPDATE OF size, pins ON chunks BEGIN
    UPDATE stats SET value = value - old.size + new.size WHERE name = 'stored_bytes';
    UPDATE stats SET value = value
        - (CASE WHEN old.pins > 0 THEN old.size ELSE 0 END)
        + (CASE WHEN new.pins > 0 THEN new.size ELSE 0 END)
        WHERE name = 'pinned_bytes';
END;
CREATE TRIGGER pinned_insert AFTER INSERT ON pinned BEGIN
    UPDATE chunks SET pins = pins + 1 WHERE id = new.id;
END;
CREATE TRIGGER pinned_delete AFTER DELETE ON pinned BEGIN
    UPDATE chunks SET pins = pins - 1 WHERE id = old.id;
END;
"""


class IndexCorrupt(IntegrityError):
    """The index database is unreadable or malformed."""


# Version 2 -> 3: which private volume each id belongs to (learned from the volume's
# id lists), so serving checks an asker's grants with one indexed lookup.
_MIGRATE_V3 = """
CREATE TABLE tags (
    id BLOB NOT NULL,
    volume BLOB NOT NULL,
    PRIMARY KEY (id, volume)
) WITHOUT ROWID;
"""


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the schema to SCHEMA_VERSION, each step in one transaction."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, 1, 2, SCHEMA_VERSION):
        raise IndexCorrupt(f"index {path} has unknown schema version {version}")
    if version == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:  # another process may have migrated meanwhile
            if version < 2:
                for stmt in _statements(_SCHEMA_V1):
                    db.execute(stmt)
                for stmt in _statements(_MIGRATE_V2):
                    db.execute(stmt)
            for stmt in _statements(_MIGRATE_V3):
                db.execute(stmt)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if version in (1, 2):
                log.info("index %s migrated from schema %d to %d", path, version, SCHEMA_VERSION)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _statements(script: str) -> Iterator[str]:
    """Split a schema script into statements (triggers hold ';' inside BEGIN .. END)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf.strip()
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement: {buf!r}")
