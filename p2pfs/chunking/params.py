"""A volume's chunking parameters and the records of cut chunks: the chunking format.

``ALGORITHM`` names the cut-point rule (docs/chunking.md): every peer of a volume
must cut a file at the same offsets, or chunk ids stop matching, so any change of
cut points is a new algorithm name.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pfs.errors import DecodeError, UsageError

ALGORITHM = "fastcdc-gear-v1"  # recorded in volumes; bump on any cut-point change


MIN_LIMIT = 64


MAX_LIMIT = 64 * 1024 * 1024


GEAR_SEED = b"p2pfs fastcdc-gear-v1"


@dataclass(frozen=True)
class ChunkParams:
    """A volume's chunking parameters, in bytes.

    They must satisfy 64 <= min_size < avg_size < max_size <= 64 MiB, and avg_size
    must be a power of two (its log2 sets the number of bits in the two masks).
    """

    min_size: int = 64 * 1024
    avg_size: int = 256 * 1024
    max_size: int = 1024 * 1024

    def validate(self) -> None:
        """Raise UsageError naming the rule the sizes break."""
        for name in ("min_size", "avg_size", "max_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise UsageError(f"chunk {name} must be an integer, not {v!r}")
        mn, avg, mx = self.min_size, self.avg_size, self.max_size
        if mn < MIN_LIMIT:
            raise UsageError(f"chunk min size must be at least {MIN_LIMIT} bytes; got {mn}")
        if mn >= avg:
            raise UsageError(f"chunk min size ({mn}) must be less than avg size ({avg})")
        if avg >= mx:
            raise UsageError(f"chunk avg size ({avg}) must be less than max size ({mx})")
        if mx > MAX_LIMIT:
            raise UsageError(f"chunk max size must be at most 64 MiB ({MAX_LIMIT}); got {mx}")
        if avg & (avg - 1):
            raise UsageError(f"chunk avg size must be a power of two; got {avg}")

    def to_dict(self) -> dict[str, int | str]:
        return {
            "algorithm": ALGORITHM,
            "min": self.min_size,
            "avg": self.avg_size,
            "max": self.max_size,
        }

    @classmethod
    def from_dict(cls, d: object) -> ChunkParams:
        """Decode and validate parameters recorded by ``to_dict``; DecodeError if bad."""
        if not isinstance(d, dict):
            raise DecodeError(f"chunk parameters must be a map, not {type(d).__name__}")
        if set(d) != {"algorithm", "min", "avg", "max"}:
            raise DecodeError(
                f"chunk parameters must have keys algorithm, min, avg, max; got {sorted(map(str, d))}"
            )
        if d["algorithm"] != ALGORITHM:
            raise DecodeError(
                f"unknown chunking algorithm {d['algorithm']!r} (this version knows {ALGORITHM!r})"
            )
        for key in ("min", "avg", "max"):
            v = d[key]
            if not isinstance(v, int) or isinstance(v, bool):
                raise DecodeError(f"chunk parameter {key} must be an integer, not {v!r}")
        params = cls(d["min"], d["avg"], d["max"])
        try:
            params.validate()
        except UsageError as e:
            raise DecodeError(f"invalid chunk parameters: {e}") from None
        return params


@dataclass(frozen=True)
class ChunkRecord:
    offset: int
    length: int
    id: bytes  # BLAKE3-256 digest (32 bytes) of the chunk's bytes


def bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv
