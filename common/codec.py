"""Weight codec: a weight list (numpy arrays) <-> bytes, never pickle, zero-copy on decode.

A *weight frame* is the one binary form of a weight list in fedmq (stored versions, deltas on the
wire). Its layout (docs/wire-format.md, "Weight codec")::

    b"FMQW" | u8 version (1) | 3 zero bytes | u32 LE header length H     12-byte prefix
    H bytes of msgpack header                                              {"v", "arrays", "data"}
    zero padding to a 64-byte boundary
    data region: each array's little-endian C-order bytes at a 64-aligned offset, zero gaps

The header is ``{"v": 1, "arrays": [[dtype, [dims...], offset, nbytes], ...], "data": total}`` with
offsets relative to the data region. The array bytes stay outside msgpack (whose unpacker copies
``bin`` fields) so :func:`decode_weights` can return ``np.frombuffer`` views over the input.

Contracts:

- Only the dtypes in :data:`ALLOWED_DTYPES` travel (bool, signed/unsigned ints, float16/32/64),
  spelled as explicit little-endian numpy codes (``"<f4"``, ``"|b1"``). Encoding converts big-endian
  and non-contiguous inputs; anything else raises :class:`~common.errors.EncodeError`.
- Decoding validates the whole header against :class:`CodecLimits` before creating any array, so
  a small message can never make the decoder allocate much. Every malformed input raises
  :class:`~common.errors.DecodeError` (and nothing else) with a message saying what is wrong.
- Frames are canonical: one weight list has exactly one frame (decode rejects non-minimal msgpack,
  misplaced offsets and non-zero padding), so ``weights_sha256(frame)`` identifies the weights.
- Decoded arrays are read-only views that keep the input buffer alive; ``np.array(a)`` copies.

For arrays inside msgpack messages (``{dtype, shape, data: bin}``), :func:`array_to_wire` and
:func:`array_from_wire` apply the same dtype and shape rules.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import msgpack
import numpy as np

from common.errors import DecodeError, EncodeError

logger = logging.getLogger(__name__)

MAGIC = b"FMQW"
FORMAT_VERSION = 1
ALIGNMENT = 64
_PREFIX = struct.Struct("<4sB3sI")
PREFIX_SIZE = _PREFIX.size
_ZEROS = bytes(ALIGNMENT)
_HEADER_KEYS = frozenset({"v", "arrays", "data"})
_WIRE_KEYS = frozenset({"dtype", "shape", "data"})

_ALLOWED_NAMES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
)
ALLOWED_DTYPES: Mapping[str, np.dtype[Any]] = {
    np.dtype(name).newbyteorder("<").str: np.dtype(name).newbyteorder("<") for name in _ALLOWED_NAMES
}
"""Wire dtype code (explicit little-endian numpy ``dtype.str``) -> dtype, for every allowed dtype."""


@dataclass(frozen=True)
class CodecLimits:
    """Bounds a decoded (or encoded) weight list must respect; callers pass tighter ones.

    ``max_total_bytes`` bounds the data region (and any single array's extent), ``max_arrays``
    the array count, ``max_ndim`` each array's number of dimensions, ``max_header_bytes`` the
    msgpack header of a frame.
    """

    max_total_bytes: int = 8 * 1024**3
    max_arrays: int = 100_000
    max_ndim: int = 32
    max_header_bytes: int = 16 * 1024**2

    def __post_init__(self) -> None:
        for name in ("max_total_bytes", "max_arrays", "max_ndim", "max_header_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"CodecLimits.{name} must be a non-negative int, got {value!r}")


DEFAULT_LIMITS = CodecLimits()


class _ArraySpec(NamedTuple):
    """One validated header entry."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int
    nbytes: int


# --- shared rules (frame entries and wire arrays) -------------------------------------------------


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _allowed_names() -> str:
    return ", ".join(_ALLOWED_NAMES)


def _parse_dtype(value: object, where: str) -> np.dtype[Any]:
    if type(value) is not str:
        raise DecodeError(f"{where}: dtype must be a string, got {type(value).__name__}")
    dtype = ALLOWED_DTYPES.get(value)
    if dtype is None:
        raise DecodeError(
            f"{where}: dtype {value!r} is not allowed (allowed: little-endian {_allowed_names()})"
        )
    return dtype


def _parse_shape(value: object, where: str, limits: CodecLimits) -> tuple[int, ...]:
    if type(value) is not list:
        raise DecodeError(f"{where}: shape must be a list of ints, got {type(value).__name__}")
    if len(value) > limits.max_ndim:
        raise DecodeError(f"{where}: {len(value)} dimensions exceed the limit of {limits.max_ndim}")
    for dim in value:
        if type(dim) is not int or dim < 0:
            raise DecodeError(f"{where}: shape {value!r} must hold non-negative ints")
    return tuple(value)


def _checked_nbytes(dtype: np.dtype[Any], shape: tuple[int, ...], where: str, limits: CodecLimits) -> int:
    """Byte size of ``shape`` x ``dtype``, in Python ints; rejects absurd shapes even when empty."""
    extent = math.prod(max(dim, 1) for dim in shape) * dtype.itemsize
    if extent > limits.max_total_bytes:
        raise DecodeError(
            f"{where}: shape {list(shape)} of {dtype.str} spans {extent} bytes, "
            f"over the limit of {limits.max_total_bytes}"
        )
    return math.prod(shape) * dtype.itemsize


def _canonical_array(weight: object, where: str, limits: CodecLimits) -> np.ndarray:
    """``weight`` as a C-contiguous little-endian array of an allowed dtype (copied only if needed)."""
    if not isinstance(weight, np.ndarray | np.generic):
        raise EncodeError(f"{where}: expected a numpy array, got {type(weight).__name__}")
    dtype = weight.dtype.newbyteorder("<")  # native or big-endian -> little-endian; "|" unchanged
    if dtype.str not in ALLOWED_DTYPES:
        raise EncodeError(f"{where}: dtype {weight.dtype} cannot be encoded (allowed: {_allowed_names()})")
    if weight.ndim > limits.max_ndim:
        raise EncodeError(f"{where}: {weight.ndim} dimensions exceed the limit of {limits.max_ndim}")
    if weight.nbytes > limits.max_total_bytes:
        raise EncodeError(f"{where}: {weight.nbytes} bytes exceed the limit of {limits.max_total_bytes}")
    return np.asarray(weight, dtype=ALLOWED_DTYPES[dtype.str], order="C")


def _byte_view(data: object, where: str) -> memoryview:
    """A flat unsigned-byte memoryview over ``data`` (no copy), or DecodeError."""
    try:
        view = memoryview(data)  # type: ignore[arg-type]
        if not view.c_contiguous:
            raise DecodeError(f"{where}: the buffer is not contiguous")
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError) as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(f"{where}: expected bytes-like data, got {type(data).__name__}") from exc


def _readonly_view(buffer: memoryview, spec: _ArraySpec, base_offset: int) -> np.ndarray:
    count = spec.nbytes // spec.dtype.itemsize
    array = np.frombuffer(buffer, dtype=spec.dtype, count=count, offset=base_offset + spec.offset)
    array = array.reshape(spec.shape)
    array.flags.writeable = False
    return array


# --- weight frames: encode -------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightFrame:
    """A weight list laid out as a frame but not yet joined.

    ``parts`` are memoryviews (prefix + header + padding, then each array's bytes and its padding)
    whose concatenation is the frame; they reference the source arrays, so write them out before
    mutating those. Joining or writing them costs one copy of the data.
    """

    parts: tuple[memoryview, ...]
    nbytes: int

    def to_bytes(self) -> bytes:
        """The frame as one ``bytes`` object (one copy of the data)."""
        return b"".join(self.parts)

    def write_into(self, out: bytearray | memoryview) -> int:
        """Write the frame at the start of ``out`` (at least :attr:`nbytes` long); returns its size."""
        target = memoryview(out).cast("B")
        if len(target) < self.nbytes:
            raise ValueError(
                f"output buffer of {len(target)} bytes is smaller than the frame ({self.nbytes})"
            )
        position = 0
        for part in self.parts:
            target[position : position + len(part)] = part
            position += len(part)
        return position

    def iter_chunks(self, chunk_size: int) -> Iterator[bytes]:
        """The frame in consecutive ``chunk_size``-byte pieces (the last may be shorter).

        Each piece costs one copy of its bytes; the whole frame is never joined.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        pending: list[memoryview] = []
        filled = 0
        for part in self.parts:
            while part:
                piece = part[: chunk_size - filled]
                pending.append(piece)
                filled += len(piece)
                part = part[len(piece) :]
                if filled == chunk_size:
                    yield b"".join(pending)
                    pending.clear()
                    filled = 0
        if pending:
            yield b"".join(pending)


def layout_frame(weights: Sequence[object], *, limits: CodecLimits = DEFAULT_LIMITS) -> WeightFrame:
    """Lay ``weights`` out as a :class:`WeightFrame` (copies only big-endian/non-contiguous arrays).

    Raises :class:`~common.errors.EncodeError` for a non-array, a dtype outside
    :data:`ALLOWED_DTYPES`, or a list over ``limits``.
    """
    if len(weights) > limits.max_arrays:
        raise EncodeError(f"{len(weights)} arrays exceed the limit of {limits.max_arrays}")
    arrays = [_canonical_array(weight, f"weight {index}", limits) for index, weight in enumerate(weights)]
    entries: list[list[object]] = []
    data_parts: list[memoryview] = []
    cursor = 0
    for array in arrays:
        offset = _align(cursor)
        if offset > cursor:
            data_parts.append(memoryview(_ZEROS)[: offset - cursor])
        entries.append([array.dtype.str, list(array.shape), offset, array.nbytes])
        data_parts.append(array.reshape(-1).view(np.uint8).data)
        cursor = offset + array.nbytes
    if cursor > limits.max_total_bytes:
        raise EncodeError(f"weights of {cursor} bytes exceed the limit of {limits.max_total_bytes}")
    header = msgpack.packb({"v": FORMAT_VERSION, "arrays": entries, "data": cursor})
    if len(header) > limits.max_header_bytes:
        raise EncodeError(
            f"frame header of {len(header)} bytes exceeds the limit of {limits.max_header_bytes}"
        )
    head = bytearray(_PREFIX.pack(MAGIC, FORMAT_VERSION, b"\0\0\0", len(header)) + header)
    head.extend(bytes(_align(len(head)) - len(head)))
    parts = (memoryview(bytes(head)), *data_parts)
    return WeightFrame(parts=parts, nbytes=len(head) + cursor)


def encode_weights(weights: Sequence[object], *, limits: CodecLimits = DEFAULT_LIMITS) -> bytes:
    """Encode a weight list as one frame (``bytes``); see :func:`layout_frame` for the errors."""
    frame = layout_frame(weights, limits=limits)
    logger.debug("encoded %d arrays into a %d-byte weight frame", len(weights), frame.nbytes)
    return frame.to_bytes()


# --- weight frames: decode -------------------------------------------------------------------------


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise DecodeError(f"weight frame: msgpack extension type {code} is not allowed in the header")


def _fail(message: str) -> NoReturn:
    raise DecodeError(f"weight frame: {message}")


def _read_prefix(buffer: memoryview, limits: CodecLimits) -> int:
    if len(buffer) < PREFIX_SIZE:
        _fail(f"{len(buffer)} bytes is shorter than the {PREFIX_SIZE}-byte prefix")
    magic, version, reserved, header_len = _PREFIX.unpack_from(buffer)
    if magic != MAGIC:
        hint = " (it looks like a pickle stream, which fedmq never loads)" if magic[:1] == b"\x80" else ""
        _fail(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}{hint}")
    if version != FORMAT_VERSION:
        _fail(f"unsupported format version {version} (this fedmq reads version {FORMAT_VERSION})")
    if reserved != b"\0\0\0":
        _fail("reserved prefix bytes are not zero")
    if header_len > limits.max_header_bytes:
        _fail(f"header of {header_len} bytes exceeds the limit of {limits.max_header_bytes}")
    if PREFIX_SIZE + header_len > len(buffer):
        _fail(f"truncated: the header claims {header_len} bytes, {len(buffer) - PREFIX_SIZE} follow")
    return int(header_len)


def _unpack_header(raw: memoryview, limits: CodecLimits) -> object:
    """Parse the msgpack header with every container bounded by the header's own size."""
    max_items = min(len(raw), max(limits.max_arrays, limits.max_ndim, 4))
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=64,
            max_bin_len=64,
            max_ext_len=0,
            max_map_len=8,
            max_array_len=max_items,
            ext_hook=_reject_ext,
        )
    except DecodeError:
        raise
    # msgpack reports malformed input as ValueError subclasses (ExtraData, FormatError, StackError)
    # or its own UnpackException; the others guard against surprises in the C unpacker.
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError) as exc:
        _fail(f"header is not valid msgpack ({exc})")


def _parse_entry(index: int, entry: object, cursor: int, limits: CodecLimits) -> _ArraySpec:
    where = f"weight frame: array {index}"
    if type(entry) is not list or len(entry) != 4:
        raise DecodeError(f"{where}: entry must be [dtype, shape, offset, nbytes]")
    dtype = _parse_dtype(entry[0], where)
    shape = _parse_shape(entry[1], where, limits)
    offset, nbytes = entry[2], entry[3]
    if type(offset) is not int or type(nbytes) is not int:
        raise DecodeError(f"{where}: offset and nbytes must be ints")
    expected = _checked_nbytes(dtype, shape, where, limits)
    if nbytes != expected:
        raise DecodeError(f"{where}: nbytes {nbytes} does not match shape {list(shape)} of {dtype.str}")
    if offset != _align(cursor):
        raise DecodeError(f"{where}: offset {offset} is not the next 64-byte boundary ({_align(cursor)})")
    return _ArraySpec(dtype, shape, offset, nbytes)


def _parse_header(header: object, limits: CodecLimits) -> tuple[list[_ArraySpec], int]:
    if type(header) is not dict or set(header) != _HEADER_KEYS:
        _fail(f"header must be a map with keys {sorted(_HEADER_KEYS)}")
    if type(header["v"]) is not int or header["v"] != FORMAT_VERSION:
        _fail(f"header version {header['v']!r} is not {FORMAT_VERSION}")
    entries, data_len = header["arrays"], header["data"]
    if type(entries) is not list:
        _fail("header 'arrays' must be a list")
    if len(entries) > limits.max_arrays:
        _fail(f"{len(entries)} arrays exceed the limit of {limits.max_arrays}")
    if type(data_len) is not int or data_len < 0:
        _fail(f"data size {data_len!r} must be a non-negative int")
    if data_len > limits.max_total_bytes:
        _fail(f"data size {data_len} is over the limit of {limits.max_total_bytes}")
    specs: list[_ArraySpec] = []
    cursor = 0
    for index, entry in enumerate(entries):
        spec = _parse_entry(index, entry, cursor, limits)
        cursor = spec.offset + spec.nbytes
        if cursor > data_len:
            _fail(f"array {index} ends at byte {cursor}, past the data size {data_len}")
        specs.append(spec)
    if cursor != data_len:
        _fail(f"data size {data_len} does not match the arrays, which end at byte {cursor}")
    return specs, data_len


_CACHED_HEADER_MAX = 64 << 10  # headers kept by _validated_header at most (64 of them: 4 MiB)


@functools.lru_cache(maxsize=64)
def _validated_header(raw_header: bytes, limits: CodecLimits) -> tuple[tuple[_ArraySpec, ...], int]:
    """The arrays and data size a header declares, checked against ``limits`` and for canonical
    form. A pure function of the header's bytes: the deltas of one model share one header, so
    each is checked once here instead of once per delta (a failed check is not cached)."""
    specs, data_len = _parse_header(_unpack_header(memoryview(raw_header), limits), limits)
    entries = [[spec.dtype.str, list(spec.shape), spec.offset, spec.nbytes] for spec in specs]
    if msgpack.packb({"v": FORMAT_VERSION, "arrays": entries, "data": data_len}) != raw_header:
        _fail("header is not in canonical form (keys out of order or non-minimal msgpack)")
    return tuple(specs), data_len


def _check_padding(
    buffer: memoryview, raw_header: memoryview, specs: Sequence[_ArraySpec], start: int
) -> None:
    """One weight list, one frame: zero padding everywhere."""
    gaps = [(PREFIX_SIZE + len(raw_header), start)]
    cursor = 0
    for spec in specs:
        gaps.append((start + cursor, start + spec.offset))
        cursor = spec.offset + spec.nbytes
    for begin, end in gaps:
        if buffer[begin:end] != _ZEROS[: end - begin]:
            _fail(f"padding bytes {begin}..{end} are not zero")


def decode_weights(
    data: bytes | bytearray | memoryview, *, limits: CodecLimits = DEFAULT_LIMITS
) -> list[np.ndarray]:
    """Decode a weight frame into read-only arrays that are views over ``data`` (zero copy).

    The whole header is validated against ``limits`` before any array is created. The arrays keep
    ``data`` alive; copy them (``np.array(a)``) to write or to release the buffer. Any malformed,
    oversized or forbidden input raises :class:`~common.errors.DecodeError`, never anything else.
    """
    buffer = _byte_view(data, "weight frame")
    header_len = _read_prefix(buffer, limits)
    raw_header = buffer[PREFIX_SIZE : PREFIX_SIZE + header_len]
    check = _validated_header if header_len <= _CACHED_HEADER_MAX else _validated_header.__wrapped__
    specs, data_len = check(bytes(raw_header), limits)
    start = _align(PREFIX_SIZE + header_len)
    if len(buffer) != start + data_len:
        _fail(f"frame is {len(buffer)} bytes, the header implies {start + data_len}")
    _check_padding(buffer, raw_header, specs, start)
    return [_readonly_view(buffer, spec, start) for spec in specs]


# --- arrays inside msgpack messages ----------------------------------------------------------------


def array_to_wire(array: np.ndarray, *, limits: CodecLimits = DEFAULT_LIMITS) -> dict[str, object]:
    """``{"dtype", "shape", "data"}`` for one array inside a msgpack message (``data`` is bytes)."""
    canonical = _canonical_array(array, "array", limits)
    return {"dtype": canonical.dtype.str, "shape": list(canonical.shape), "data": canonical.tobytes()}


def array_from_wire(obj: object, *, limits: CodecLimits = DEFAULT_LIMITS, where: str = "array") -> np.ndarray:
    """The read-only array (a view over ``obj["data"]``) of a map made by :func:`array_to_wire`.

    ``where`` names the field in error messages. Raises :class:`~common.errors.DecodeError` for a
    wrong map, a forbidden dtype, a shape over ``limits``, or data of the wrong size.
    """
    if type(obj) is not dict or set(obj) != _WIRE_KEYS:
        raise DecodeError(f"{where}: must be a map with keys {sorted(_WIRE_KEYS)}")
    dtype = _parse_dtype(obj["dtype"], where)
    shape = _parse_shape(obj["shape"], where, limits)
    nbytes = _checked_nbytes(dtype, shape, where, limits)
    if not isinstance(obj["data"], bytes | bytearray | memoryview):
        raise DecodeError(f"{where}: data must be binary, got {type(obj['data']).__name__}")
    buffer = _byte_view(obj["data"], where)
    if len(buffer) != nbytes:
        raise DecodeError(
            f"{where}: data is {len(buffer)} bytes, shape {list(shape)} of {dtype.str} needs {nbytes}"
        )
    return _readonly_view(buffer, _ArraySpec(dtype, shape, 0, nbytes), 0)


# --- helpers ---------------------------------------------------------------------------------------


def weights_nbytes(weights: Sequence[np.ndarray]) -> int:
    """Total bytes of the arrays' data (what a frame's data region holds, without padding)."""
    return sum(int(np.asarray(weight).nbytes) for weight in weights)


def weights_sha256(frame: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of a frame; frames are canonical, so equal weight lists give equal digests."""
    return hashlib.sha256(frame).hexdigest()
