"""Canonical, bounded msgpack: the only module that imports ``msgpack``.

``pack`` writes one canonical encoding per value: maps with their keys sorted,
integers in their shortest form (msgpack's own rule), str as UTF-8 ``str``
types, bytes as ``bin`` types. Only None, bool, int, bytes, str, list/tuple and
dict are accepted; floats, ext types and everything else raise TypeError, so a
value has exactly one encoding and its id is stable.

``unpack`` decodes hostile bytes safely: every length is bounded by the input
size, nesting is bounded (``MAX_DEPTH``), ext types are refused, and every
failure (truncation, trailing bytes, bad UTF-8, an int map key, too deep, ...)
becomes ``DecodeError``. With ``canonical=True`` it also refuses any encoding that
``pack`` would not have produced (unsorted or duplicate keys, long forms of short
integers or strings, floats), by re-packing the result and comparing bytes.

msgpack's C unpacker has a fixed stack of 1024 containers and raises StackError
beyond it (10,000 nested arrays fail cleanly, they do not crash); ``MAX_DEPTH``
is then checked by an iterative walk of the (already bounded) result, the same
walk that refuses floats and checks map key order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import msgpack

from p2pfs.errors import DecodeError

log = logging.getLogger(__name__)

MAX_DEPTH = 32  # containers inside containers; the objects need 4


_SCALARS = frozenset({type(None), bool, int, str, bytes})
_PACKABLE_LEAVES = (bool, int, str, bytes, bytearray, memoryview)


def _sort_key(key: str | bytes) -> tuple[int, bytes]:
    if isinstance(key, str):
        return (0, key.encode("utf-8"))
    return (1, key)


def _scan(obj: object, max_depth: int, *, decoded: bool) -> bool:
    """Check types and nesting; return whether every map's keys are in canonical order.

    Raises TypeError for a type with no canonical encoding (float, set, ext, ...)
    and ValueError for nesting deeper than ``max_depth``. With ``decoded``, only
    the exact types the unpacker produces are allowed. Lists of scalars (most of
    the data) are checked with one C-level pass over their element types.
    """
    ordered = True
    stack: list[tuple[object, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
            keys = list(item)
            for k in keys:
                if type(k) is not str and type(k) is not bytes:
                    raise TypeError(f"map keys must be str or bytes, not {type(k).__name__}")
            if ordered and keys != sorted(keys, key=_sort_key):
                ordered = False
        elif isinstance(item, list | tuple):
            if decoded and type(item) is not list:
                raise TypeError(f"unexpected {type(item).__name__}")
            children = item
        else:
            if item is None or type(item) in _SCALARS:
                continue
            if not decoded and isinstance(item, _PACKABLE_LEAVES) and not isinstance(item, float):
                continue
            raise TypeError(f"{type(item).__name__} has no canonical encoding")
        if depth >= max_depth:
            raise ValueError(f"value nests deeper than {max_depth} containers")
        types = set(map(type, children))
        if types <= _SCALARS:
            continue
        stack.extend((x, depth + 1) for x in children)
    return ordered


def _normalize(obj: Any) -> Any:
    """A copy of ``obj`` with every map's keys in canonical order."""
    if isinstance(obj, dict):
        return {k: _normalize(obj[k]) for k in sorted(obj, key=_sort_key)}
    if isinstance(obj, list | tuple):
        return [_normalize(x) for x in obj]
    return obj


def _packb(obj: object) -> bytes:
    try:
        data: bytes = msgpack.packb(obj, use_bin_type=True)
    except OverflowError as e:
        raise ValueError(f"integer out of the 64-bit range: {e}") from None
    return data


def pack(obj: object) -> bytes:
    """The canonical msgpack encoding of ``obj``.

    TypeError for a type with no canonical encoding (float, set, ...), ValueError
    for an integer outside -2**63..2**64-1 or nesting deeper than ``MAX_DEPTH``.
    """
    if not _scan(obj, MAX_DEPTH, decoded=False):
        obj = _normalize(obj)
    return _packb(obj)


def _refuse_ext(code: int, data: bytes) -> object:
    raise DecodeError(f"msgpack ext type {code} is not allowed")


def unpack(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int,
    canonical: bool = False,
    max_depth: int = MAX_DEPTH,
) -> object:
    """Decode one msgpack value of at most ``max_size`` bytes; DecodeError if bad.

    ``canonical=True`` also requires ``data`` to be exactly ``pack(result)``.
    """
    size = len(data)
    if size > max_size:
        raise DecodeError(f"encoded value is {size} bytes, more than the limit of {max_size}")
    if size == 0:
        raise DecodeError("encoded value is empty")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            timestamp=0,
            max_bin_len=max_size,
            max_str_len=max_size,
            max_array_len=max_size,
            max_map_len=max_size,
            max_ext_len=0,
        )
    except DecodeError:
        raise
    except msgpack.ExtraData:
        raise DecodeError("encoded value has trailing bytes") from None
    except msgpack.StackError:
        raise DecodeError("msgpack value nests too deeply") from None
    except UnicodeDecodeError:
        raise DecodeError("msgpack string is not valid UTF-8") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as e:
        if "max_ext_len" in str(e):
            raise DecodeError("msgpack ext types are not allowed") from None
        raise DecodeError(f"malformed msgpack: {e or type(e).__name__}") from None
    except Exception as e:  # msgpack may raise other things for hostile input
        raise DecodeError(f"malformed msgpack ({type(e).__name__}): {e}") from None
    try:
        ordered = _scan(obj, max_depth, decoded=True)
    except ValueError as e:
        raise DecodeError(f"msgpack {e}") from None
    except TypeError as e:
        raise DecodeError(f"msgpack value not allowed: {e}") from None
    if canonical:
        # Decoded maps keep their encoded key order, so with the order checked,
        # re-packing as is gives back ``data`` exactly when it was canonical
        # (duplicate keys and long forms of ints, strings and lengths differ).
        if not ordered:
            raise DecodeError("encoding is not canonical: map keys are not sorted")
        if _packb(obj) != data:
            raise DecodeError(
                "encoding is not canonical (duplicate keys, or a long form of a value)"
            )
    return obj
