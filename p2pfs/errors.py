"""The project's error types and the exit codes and errno values they map to.

User errors are quiet: the CLI prints their message (one line, naming what is
wrong) and exits with their ``exit_code``; no traceback. Anything that is not a
``P2pfsError`` is a bug and is loud.
"""

from __future__ import annotations

import errno

# Documented in docs/cli.md ("Exit codes").
EXIT_OK = 0
EXIT_ERROR = 1  # generic user error
EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_NOT_FOUND = 3  # a named volume, path, node home or object does not exist
EXIT_CORRUPT = 4  # stored data failed verification
EXIT_BUSY = 5  # a mountpoint or daemon is already in use
EXIT_NOT_RUNNING = 6  # no daemon answers for this home


class P2pfsError(Exception):
    """An error a user can act on: its message is shown as is."""

    exit_code = EXIT_ERROR
    errno = errno.EIO


class UsageError(P2pfsError):
    exit_code = EXIT_USAGE
    errno = errno.EINVAL


class NotFound(P2pfsError):
    exit_code = EXIT_NOT_FOUND
    errno = errno.ENOENT


class Busy(P2pfsError):
    exit_code = EXIT_BUSY
    errno = errno.EBUSY


class NotRunning(P2pfsError):
    exit_code = EXIT_NOT_RUNNING
    errno = errno.ENOTCONN


class IntegrityError(P2pfsError):
    """Bytes failed verification: a hash, a signature, or a format rule."""

    exit_code = EXIT_CORRUPT
    errno = errno.EIO


class DecodeError(IntegrityError):
    """An encoded object is malformed, oversized or violates a format rule."""


class SignatureError(IntegrityError):
    """A signature does not verify, or a snapshot would roll a volume back."""


class CorruptChunk(IntegrityError):
    """A stored chunk's bytes do not hash to its id; it has been quarantined."""


class MissingChunk(NotFound):
    """A chunk is not in the local store (and, for now, nowhere else)."""

    errno = errno.EIO
