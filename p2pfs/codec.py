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
is then checked by an iterative walk of the (already bounded) result.
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack

from .errors import DecodeError

log = logging.getLogger(__name__)

MAX_DEPTH = 32  # containers inside containers; the objects need 4
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1


def _sort_key(key: str | bytes) -> tuple[int, bytes]:
    if isinstance(key, str):
        return (0, key.encode("utf-8"))
    return (1, key)


def _normalize(obj: Any, depth: int) -> Any:
    """A copy of ``obj`` with its maps' keys in canonical order; TypeError if not packable."""
    if depth > MAX_DEPTH:
        raise ValueError(f"value nests deeper than {MAX_DEPTH} containers")
    if obj is None or isinstance(obj, bool | str | bytes):
        return obj
    if isinstance(obj, int):
        if not _INT_MIN <= obj <= _INT_MAX:
            raise ValueError(f"integer {obj} does not fit in 64 bits")
        return obj
    if isinstance(obj, list | tuple):
        return [_normalize(x, depth + 1) for x in obj]
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, str | bytes):
                raise TypeError(f"map keys must be str or bytes, not {type(k).__name__}")
        return {k: _normalize(obj[k], depth + 1) for k in sorted(obj, key=_sort_key)}
    if isinstance(obj, bytearray | memoryview):
        return bytes(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} canonically")


def pack(obj: object) -> bytes:
    """The canonical msgpack encoding of ``obj``; TypeError for an unsupported type."""
    data: bytes = msgpack.packb(_normalize(obj, 0), use_bin_type=True)
    return data


def _refuse_ext(code: int, data: bytes) -> object:
    raise DecodeError(f"msgpack ext type {code} is not allowed")


def _check_depth(obj: object, max_depth: int) -> None:
    """Refuse nesting beyond ``max_depth`` and any type ``pack`` does not produce."""
    stack: list[tuple[object, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            if depth >= max_depth:
                raise DecodeError(f"msgpack value nests deeper than {max_depth} containers")
            stack.extend((x, depth + 1) for x in item)
        elif isinstance(item, dict):
            if depth >= max_depth:
                raise DecodeError(f"msgpack value nests deeper than {max_depth} containers")
            stack.extend((v, depth + 1) for v in item.values())
        elif item is None or isinstance(item, bool | int | str | bytes):
            pass
        else:
            raise DecodeError(f"msgpack value of type {type(item).__name__} is not allowed")


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
    _check_depth(obj, max_depth)
    if canonical:
        try:
            again = pack(obj)
        except (TypeError, ValueError) as e:
            raise DecodeError(f"encoding is not canonical: {e}") from None
        if again != data:
            raise DecodeError(
                "encoding is not canonical (unsorted or duplicate keys, or a long form)"
            )
    return obj
