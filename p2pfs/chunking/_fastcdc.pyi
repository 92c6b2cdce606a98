"""Typing stub for the native FastCDC scan kernel (native/fastcdc.pyx)."""

_Buffer = bytes | bytearray | memoryview

class Cutter:
    """Chunking parameters with their derived masks; raises ValueError if invalid."""

    @property
    def bits(self) -> int: ...
    @property
    def masks(self) -> tuple[int, int]: ...
    def __init__(self, min_size: int, avg_size: int, max_size: int) -> None: ...
    def cut(self, data: _Buffer, eof: bool) -> int:
        """Length of the first chunk of data (a chunk start); 0 if more bytes are needed."""
    def cut_points(self, data: _Buffer) -> list[int]:
        """End offsets of every chunk of data taken as a whole stream."""

def gear_table() -> list[int]: ...
