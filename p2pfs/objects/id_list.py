"""A private snapshot's id list: every stored id it reaches, with sizes, in parts.

Ids and sizes only (never keys): a node that may only cache the volume learns from it
what to fetch, pin and serve (and how much room that takes), nothing of the content.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pfs.errors import DecodeError

from . import codec
from .model import (
    FORMAT_VERSION,
    MAX_CHUNK_LENGTH,
    MAX_ID_LIST,
    MAX_ID_LIST_BYTES,
    _header,
    _id,
    _int,
    _list,
    _opt_id,
    _unpack,
)


@dataclass(frozen=True)
class IdList:
    """Part of a private snapshot's id list: the stored ids it reaches with their stored
    sizes, and the next part's id.

    Ids and sizes only (never keys): a node that may only cache the volume learns from it
    what to fetch, pin and serve (and how much room that takes), nothing of the content.
    """

    ids: tuple[bytes, ...]
    sizes: tuple[int, ...]
    next: bytes | None

    def __post_init__(self) -> None:
        if not isinstance(self.ids, tuple) or len(self.ids) > MAX_ID_LIST:
            raise DecodeError(f"an id list part holds a tuple of at most {MAX_ID_LIST} ids")
        if not isinstance(self.sizes, tuple) or len(self.sizes) != len(self.ids):
            raise DecodeError("an id list part has one size per id")
        for i, (oid, size) in enumerate(zip(self.ids, self.sizes, strict=True)):
            _id(oid, f"id list entry {i}")
            _int(size, f"id list size {i}", 0, MAX_CHUNK_LENGTH + 4096)
        _opt_id(self.next, "id list next")

    def encode(self) -> bytes:
        return codec.pack(
            {
                "i": list(self.ids),
                "n": self.next,
                "s": list(self.sizes),
                "t": "ids",
                "v": FORMAT_VERSION,
            }
        )


def decode_id_list(data: bytes) -> IdList:
    obj = _header(_unpack(data, "ids", MAX_ID_LIST_BYTES), "ids", {"v", "t", "i", "s", "n"})
    ids = tuple(_list(obj["i"], "id list", MAX_ID_LIST))
    return IdList(ids, tuple(_list(obj["s"], "id list sizes", MAX_ID_LIST)), obj["n"])
