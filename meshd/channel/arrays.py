"""Arrays and byte strings as two ZeroMQ frames: a msgpack header and one contiguous buffer.

Wire format (version 1), one multipart message of exactly two frames::

    frame 0  msgpack map {"v": 1, "kind": "array" | "bytes", "dtype": DTYPE,
                          "shape": [int, ...], "order": "C", "meta": {...}}
    frame 1  the raw bytes: prod(shape) * itemsize of them, in C order

``DTYPE`` is numpy's ``dtype.str`` (``"<f4"``, ``"|u1"``, ``"<M8[ns]"``, ``"|S5"``, ``"<U3"``,
``"|V8"``) or, for a structured dtype, its ``dtype.descr`` as ``[[name, dtype.str], ...]``.
Allowed kinds: bool, signed and unsigned integers, floats, complex, datetime64, timedelta64,
fixed-width bytes and str, raw void.  Object dtypes (and anything holding Python objects) are
refused: the header only ever selects a memory layout, nothing in it is executed or unpickled.
``kind`` ``"bytes"`` carries a byte string; its header is ``dtype "|u1"``, ``shape [len]``.
Every key is required and no other key is allowed; a change to the format bumps ``v``.

:func:`encode_message` and :func:`decode_message` are pure.  :func:`send_array` and
:func:`recv_array` are the thin synchronous pyzmq glue: zero copy on both sides for buffers of
at least ``zmq.COPY_THRESHOLD`` (64 KiB; pyzmq copies smaller ones, which is faster).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgpack
import numpy as np

from ..errors import LocalError, ProtocolError

__all__ = [
    "MAX_DIMS",
    "MAX_FIELDS",
    "MAX_HEADER",
    "MAX_META",
    "VERSION",
    "ArrayMessage",
    "decode_message",
    "encode_message",
    "recv_array",
    "send_array",
]

VERSION: Final = 1
MAX_DIMS: Final = 32
"""Most dimensions an array may have (numpy 2 allows 64)."""
MAX_META: Final = 64 << 10
"""Most bytes the msgpack encoding of ``meta`` may take."""
MAX_FIELDS: Final = 256
"""Most fields a structured dtype may have."""
MAX_HEADER: Final = MAX_META + (32 << 10)
"""Most bytes a header frame may take: ``MAX_META`` plus room for shape and a structured dtype."""

_KEYS: Final = frozenset({"v", "kind", "dtype", "shape", "order", "meta"})
_KINDS: Final = frozenset("biufcmMSUV")
_MAX_NBYTES: Final = 1 << 62  # numpy refuses sizes past intp; stay well inside
# A canonical ``dtype.str`` of an allowed kind; anything else never reaches ``np.dtype``.
_DTYPE_STR: Final = re.compile(r"[<>|](?:[biufcSUV][0-9]{1,9}|[mM]8(?:\[[0-9]{0,9}[A-Za-z]{1,7}\])?)")
_BYTE: Final = np.dtype(np.uint8)


@dataclass(frozen=True, slots=True)
class ArrayMessage:
    """One decoded message.

    ``array``: a numpy view of the received buffer (no copy); writable only if the buffer was
    (pyzmq ``Frame.buffer`` is, ``bytes`` are not).  For ``kind == "bytes"`` it is the 1-d
    ``uint8`` view of the payload.  ``data``: the same payload as a flat byte memoryview.
    ``meta``: the sender's metadata dict.  Both views keep the received frame alive.
    """

    kind: Literal["array", "bytes"]
    array: np.ndarray[Any, np.dtype[Any]]
    data: memoryview
    meta: dict[str, Any]


# ---------------------------------------------------------------------------------- encode


def encode_message(obj: object, meta: Mapping[str, Any] | None = None) -> list[bytes | memoryview]:
    """Frames ``[header, buffer]`` for a numpy array (or scalar) or a bytes-like ``obj``.

    A C-contiguous array travels without a copy: ``buffer`` is a byte view of its memory, so the
    caller must not modify the array until the frames are sent.  Any other layout (Fortran
    order, strided views) is copied once into C order (``np.asarray(obj, order="C")``).  A non-contiguous
    ``memoryview`` is copied once too.  ``meta`` must be a dict with str keys that msgpack can
    encode in at most ``MAX_META`` bytes.

    Raises :class:`~meshd.errors.LocalError` (reason ``dtype``, ``type`` or ``meta``).
    """
    meta_d = _check_meta(meta)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        buf = _flat_bytes(memoryview(obj))
        if buf is None:  # not contiguous, or an item format that cannot be cast: copy once
            buf = memoryview(memoryview(obj).tobytes())
        header: dict[str, Any] = {"v": VERSION, "kind": "bytes", "dtype": "|u1",
                                  "shape": [buf.nbytes], "order": "C", "meta": meta_d}
        return [_pack_header(header, meta_d), buf]
    if isinstance(obj, np.ma.MaskedArray):
        raise LocalError("masked arrays are not supported: send .data and the mask separately",
                         reason="type")
    if isinstance(obj, np.generic):
        obj = np.asarray(obj)
    if not isinstance(obj, np.ndarray):
        raise LocalError(f"cannot send a {type(obj).__name__}: pass a numpy array or bytes",
                         reason="type")
    arr = np.asarray(obj, order="C")  # no copy when already C-contiguous; keeps 0-d arrays
    header = {"v": VERSION, "kind": "array", "dtype": _dtype_to_wire(arr.dtype),
              "shape": list(arr.shape), "order": "C", "meta": meta_d}
    # view(uint8) of the flat array works for every dtype, including datetime64, which the
    # buffer protocol (memoryview(arr)) refuses to export.
    buf = arr.reshape(-1).view(_BYTE).data
    return [_pack_header(header, meta_d), buf]


def _flat_bytes(view: memoryview) -> memoryview | None:
    """``view`` as a flat byte memoryview without copying, or None if that is impossible."""
    if not view.c_contiguous:
        return None
    if view.format == "B" and view.ndim == 1:
        return view
    try:
        return view.cast("B")
    except (TypeError, ValueError):
        return None


def _check_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise LocalError(f"meta must be a dict, not {type(meta).__name__}", reason="meta")
    meta_d = dict(meta)
    if not all(isinstance(k, str) for k in meta_d):
        raise LocalError("meta keys must be str", reason="meta")
    return meta_d


def _pack_header(header: dict[str, Any], meta: dict[str, Any]) -> bytes:
    try:
        packed: bytes = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise LocalError(f"meta cannot be encoded with msgpack: {e}", reason="meta") from None
    if len(packed) > MAX_META:  # only then can meta itself be too large: measure it alone
        size = len(msgpack.packb(meta, use_bin_type=True))
        if size > MAX_META:
            raise LocalError(f"meta takes {size} bytes encoded, more than {MAX_META}",
                             reason="meta")
        if len(packed) > MAX_HEADER:
            raise LocalError(f"header takes {len(packed)} bytes, more than {MAX_HEADER}",
                             reason="dtype")
    return packed


@functools.lru_cache(maxsize=256)
def _dtype_to_wire(dt: np.dtype[Any]) -> str | tuple[tuple[str, str], ...]:
    if dt.fields is None:
        if not _simple_dtype_ok(dt):
            raise LocalError(f"dtype {dt} cannot be sent: only bool, numbers, datetime64, "
                             "timedelta64, fixed-width bytes/str and raw void", reason="dtype")
        return dt.str
    descr = dt.descr
    ok = (0 < len(descr) <= MAX_FIELDS
          and all(len(f) == 2 and isinstance(f[0], str) and f[0] and isinstance(f[1], str)
                  and _simple_dtype_ok(np.dtype(f[1])) for f in descr))
    if not ok or np.dtype(descr) != dt:
        raise LocalError(f"structured dtype {dt} cannot be sent: only flat, packed records of "
                         "simple fields (no objects, padding, titles, sub-arrays or nesting)",
                         reason="dtype")
    return tuple((str(f[0]), str(f[1])) for f in descr)


def _simple_dtype_ok(dt: np.dtype[Any]) -> bool:
    return (dt.kind in _KINDS and dt.fields is None and dt.subdtype is None
            and not dt.hasobject and dt.itemsize > 0 and _DTYPE_STR.fullmatch(dt.str) is not None)


# ---------------------------------------------------------------------------------- decode


def decode_message(frames: Sequence[Any]) -> ArrayMessage:
    """The message in ``frames`` (two buffer-protocol objects: bytes, memoryview, zmq.Frame).

    The array is ``np.frombuffer`` on the second frame: no copy.  Raises
    :class:`~meshd.errors.ProtocolError` and nothing else on any malformed input, with reason
    ``frames``, ``header``, ``version``, ``kind``, ``dtype``, ``shape``, ``order``, ``meta`` or
    ``size``.
    """
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}", reason="frames")
    try:
        head = memoryview(frames[0])
        buf = memoryview(frames[1])
    except TypeError:
        raise ProtocolError("frames must be bytes-like", reason="frames") from None
    if head.nbytes > MAX_HEADER:
        raise ProtocolError(f"header of {head.nbytes} bytes", reason="header")
    flat = _flat_bytes(buf)
    if flat is None:
        raise ProtocolError("buffer frame is not a contiguous byte buffer", reason="frames")
    buf = flat
    try:
        header = msgpack.unpackb(head, raw=False)
    except Exception:  # msgpack raises several unrelated types on garbage  # noqa: BLE001
        raise ProtocolError("header is not valid msgpack", reason="header") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map", reason="header")
    if header.keys() != _KEYS:
        missing = sorted(map(str, _KEYS - header.keys()))
        extra = sorted(map(repr, header.keys() - _KEYS))
        raise ProtocolError(f"header keys: missing {missing}, unexpected {extra}",
                            reason="header")
    v = header["v"]
    if type(v) is not int or v != VERSION:
        raise ProtocolError(f"unsupported header version {v!r}", reason="version")
    kind = header["kind"]
    if kind not in ("array", "bytes"):
        raise ProtocolError(f"unknown kind {kind!r}", reason="kind")
    if header["order"] != "C":
        raise ProtocolError(f"unsupported order {header['order']!r}", reason="order")
    meta = header["meta"]
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise ProtocolError("meta is not a map with str keys", reason="meta")
    dt = _dtype_from_wire(header["dtype"])
    shape = _shape_from_wire(header["shape"])
    if kind == "bytes" and (dt != _BYTE or len(shape) != 1):
        raise ProtocolError("a bytes message must have dtype |u1 and one dimension",
                            reason="kind")
    count = math.prod(shape)
    if count * dt.itemsize != buf.nbytes:
        raise ProtocolError(f"shape {shape} of {dt.str} needs {count * dt.itemsize} bytes, "
                            f"the buffer has {buf.nbytes}", reason="size")
    try:
        array = np.frombuffer(buf, dtype=dt).reshape(shape)
    except (ValueError, TypeError) as e:  # defensive: validation above should make this dead
        raise ProtocolError(f"cannot view the buffer as {dt.str} {shape}: {e}",
                            reason="size") from None
    return ArrayMessage(kind="array" if kind == "array" else "bytes", array=array, data=buf, meta=meta)


def _dtype_from_wire(value: object) -> np.dtype[Any]:
    if isinstance(value, str):
        return _simple_dtype_from_wire(value)
    if not isinstance(value, list) or not 0 < len(value) <= MAX_FIELDS:
        raise ProtocolError("dtype is neither a dtype string nor a list of fields",
                            reason="dtype")
    fields: list[tuple[str, np.dtype[Any]]] = []
    for f in value:
        if (not isinstance(f, list) or len(f) != 2 or not isinstance(f[0], str)
                or not 0 < len(f[0]) <= 256):
            raise ProtocolError("a dtype field is not [name, dtype]", reason="dtype")
        fields.append((f[0], _simple_dtype_from_wire(f[1])))
    if len({name for name, _ in fields}) != len(fields):
        raise ProtocolError("duplicate field names in dtype", reason="dtype")
    try:
        return np.dtype(fields)
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"bad structured dtype: {e}", reason="dtype") from None


def _simple_dtype_from_wire(value: object) -> np.dtype[Any]:
    if not isinstance(value, str):
        raise ProtocolError(f"dtype {value!r} is not an allowed dtype", reason="dtype")
    return _parse_dtype_str(value)


@functools.lru_cache(maxsize=256)  # only successes are cached; a peer cannot grow it past that
def _parse_dtype_str(value: str) -> np.dtype[Any]:
    if _DTYPE_STR.fullmatch(value) is None:
        raise ProtocolError(f"dtype {value!r} is not an allowed dtype", reason="dtype")
    try:
        dt = np.dtype(value)
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"bad dtype {value!r}: {e}", reason="dtype") from None
    if not _simple_dtype_ok(dt) or dt.str != value:
        raise ProtocolError(f"dtype {value!r} is not an allowed dtype", reason="dtype")
    return dt


def _shape_from_wire(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise ProtocolError(f"shape must be a list of at most {MAX_DIMS} ints", reason="shape")
    if not all(type(d) is int and d >= 0 for d in value):
        raise ProtocolError("shape entries must be non-negative ints", reason="shape")
    if math.prod(d for d in value if d) > _MAX_NBYTES:  # numpy refuses these even when empty
        raise ProtocolError(f"shape {value} is too large", reason="shape")
    return tuple(value)


# ---------------------------------------------------------------------------------- pyzmq


def send_array(sock: Any, obj: object, meta: Mapping[str, Any] | None = None,
               copy: bool = False, flags: int = 0) -> None:
    """Send ``obj`` (see :func:`encode_message`) on a pyzmq socket as one multipart message.

    With ``copy=False`` ZeroMQ reads the array's memory after this returns: do not modify the
    array until it is sent, and close the socket with a linger and terminate the context before
    the process exits, or queued messages are lost.
    """
    sock.send_multipart(encode_message(obj, meta), flags=flags, copy=copy)


def recv_array(sock: Any, copy: bool = False, flags: int = 0) -> ArrayMessage:
    """Receive one message from a pyzmq socket; with ``copy=False`` the array views the frame.

    Raises :class:`~meshd.errors.ProtocolError` if the message is malformed (it is consumed).
    """
    parts = sock.recv_multipart(flags=flags, copy=copy)
    return decode_message([p.buffer if not isinstance(p, bytes) else p for p in parts])
