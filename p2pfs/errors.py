"""The project's error types, the exit codes and errno values they map to, and the one
errno table of the filesystem layers (``errno_of``).

User errors are quiet: the CLI prints their message (one line, naming what is
wrong) and exits with their ``exit_code``; no traceback. Anything that is not a
``P2pfsError`` is a bug and is loud.
"""

from __future__ import annotations

import errno
import os

# Documented in docs/cli.md ("Exit codes").
EXIT_OK = 0
EXIT_ERROR = 1  # generic user error
EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_NOT_FOUND = 3  # a named volume, path, node home or object does not exist
EXIT_CORRUPT = 4  # stored data failed verification
EXIT_BUSY = 5  # a mountpoint or daemon is already in use
EXIT_NOT_RUNNING = 6  # no daemon listens on this home's control socket
EXIT_CONNECTION = 7  # the daemon took a request but its connection broke before the answer
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, what shells report)


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


class ConnectionLost(P2pfsError):
    """The daemon accepted a request and its control connection broke before the answer
    (it died, or dropped the connection): not the same as no daemon at all (NotRunning),
    and the operation may or may not have happened."""

    exit_code = EXIT_CONNECTION
    errno = errno.ECONNRESET


class Interrupted(P2pfsError):
    """The user pressed Ctrl-C; the message says what became of the operation."""

    exit_code = EXIT_INTERRUPTED
    errno = errno.EINTR


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


class ErrnoError(Exception):
    """A filesystem's answer to one call: the errno the FUSE caller gets (refused, not
    found, ...). Not a user error and not a bug; never printed as a message."""

    def __init__(self, err: int, what: str = "") -> None:
        super().__init__(what or os.strerror(err))
        self.errno = err


# Failures of the staging disk a writer should see as they are, not as a bug.
ERRNO_PASSED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def errno_of(e: BaseException) -> int | None:
    """The errno a known failure maps to, or None for a bug (answered EIO, and loud)."""
    if isinstance(e, ErrnoError):
        return e.errno
    if isinstance(e, OSError) and e.errno is not None and e.errno in ERRNO_PASSED:
        return e.errno
    if isinstance(e, P2pfsError):
        return e.errno
    return None
