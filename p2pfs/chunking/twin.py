"""The pure-Python twin of the native FastCDC scan: written from docs/chunking.md, slow,
for checking only. The tests and ``chunker.self_test()`` hold the two to identical cut
points."""

from __future__ import annotations

import blake3

from .params import GEAR_SEED, ChunkParams, bytes_view

_M64 = (1 << 64) - 1


def derive_gear_table() -> list[int]:
    """The gear table by its definition: BLAKE3 XOF of GEAR_SEED, 256 LE uint64s."""
    xof = blake3.blake3(GEAR_SEED).digest(length=256 * 8)
    return [int.from_bytes(xof[8 * i : 8 * i + 8], "little") for i in range(256)]


GEAR_TABLE = derive_gear_table()


def masks(params: ChunkParams) -> tuple[int, int]:
    """(MASK_S, MASK_L): b+2 and b-2 one bits ending at bit 62, b = log2(avg_size)."""
    params.validate()
    b = params.avg_size.bit_length() - 1

    def mask(k: int) -> int:
        return ((1 << k) - 1) << (63 - k)

    return mask(b + 2), mask(b - 2)


def cut_points_py(data: bytes | bytearray | memoryview, params: ChunkParams) -> list[int]:
    """Pure-Python twin of ``cut_points``: must cut at identical points."""
    mask_s, mask_l = masks(params)
    buf = bytes(bytes_view(data))
    gear = GEAR_TABLE
    n_total = len(buf)
    out: list[int] = []
    start = 0
    while start < n_total:
        n = n_total - start
        if n <= params.min_size:
            length = n
        else:
            end = min(n, params.max_size)
            normal = min(params.avg_size, end)
            length = end
            h = 0
            for i in range(params.min_size, end):
                h = ((h << 1) + gear[buf[start + i]]) & _M64
                if h & (mask_s if i < normal else mask_l) == 0:
                    length = i + 1
                    break
        start += length
        out.append(start)
    return out
