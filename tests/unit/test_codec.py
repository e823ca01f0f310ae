"""The weight codec: round-trips, zero-copy decode, and hostile input that only ever gives DecodeError."""

from __future__ import annotations

import gc
import json
import pickle
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from typer.testing import CliRunner

from common.codec import (
    ALLOWED_DTYPES,
    DEFAULT_LIMITS,
    CodecLimits,
    array_from_wire,
    array_to_wire,
    decode_weights,
    encode_weights,
    layout_frame,
    weights_nbytes,
    weights_sha256,
)
from common.errors import DecodeError, EncodeError
from coordinator.bench.codec import realistic_layer_shapes

ALLOWED = [np.dtype(code) for code in ALLOWED_DTYPES]
SMALL_INPUT_PEAK = 1 << 20  # bytes a decode of a few-kB input may allocate, all included


def _same(original: np.ndarray, decoded: np.ndarray) -> bool:
    """Same shape, same value type, bit-identical little-endian bytes (NaN payloads and -0.0 too)."""
    little = original.astype(original.dtype.newbyteorder("<"))
    return (
        decoded.shape == original.shape
        and decoded.dtype == little.dtype
        and decoded.tobytes() == np.ascontiguousarray(little).tobytes()
    )


def _frame(header: object, data: bytes = b"", *, pad: bool = True) -> bytes:
    """A frame around any msgpack-able ``header``, with the prefix length set right."""
    raw = msgpack.packb(header)
    head = struct.pack("<4sB3sI", b"FMQW", 1, b"\0\0\0", len(raw)) + raw
    return head + bytes(-len(head) % 64 if pad else 0) + data


def _decode_outcome(data: bytes, limits: CodecLimits = DEFAULT_LIMITS) -> tuple[str, int]:
    """("ok" | "DecodeError", peak bytes allocated while decoding); any other exception propagates.

    The decode runs twice and the smaller peak counts: an allocation the message causes happens
    every time, while a one-off growth of an interpreter-wide table (msgpack interns map keys in
    Python's string table, whose resize costs ~2 MB in a big process) lands in one window only.
    The garbage collector is paused so that finalizers of unrelated garbage cannot run inside.
    """
    outcomes: set[str] = set()
    peaks: list[int] = []
    for _ in range(2):
        gc.disable()
        tracemalloc.start()
        try:
            try:
                decode_weights(data, limits=limits)
                outcomes.add("ok")
            except DecodeError:
                outcomes.add("DecodeError")
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
            gc.enable()
    assert len(outcomes) == 1, "decoding the same bytes twice gave different outcomes"
    return outcomes.pop(), min(peaks)


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace pickle's loaders with spies; the test fails if any of them is called."""
    calls: list[str] = []

    def spy(name: str) -> Callable[..., Any]:
        def called(*args: object, **kwargs: object) -> None:
            calls.append(name)
            raise AssertionError(f"pickle.{name} was called")

        return called

    monkeypatch.setattr(pickle, "loads", spy("loads"))
    monkeypatch.setattr(pickle, "load", spy("load"))
    monkeypatch.setattr(pickle, "Unpickler", spy("Unpickler"))
    return calls


# --- round-trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALLOWED, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (2, 3, 4)], ids=str)
def test_every_allowed_dtype_and_shape_round_trips(dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
    # Prepare
    original = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)

    # Execute
    decoded = decode_weights(encode_weights([original]))

    # Assert
    assert len(decoded) == 1 and _same(original, decoded[0])


def test_big_endian_and_non_contiguous_inputs_round_trip_as_little_endian_c_order() -> None:
    # Prepare
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    weights = [
        base.astype(">f8"),
        base.T,
        base[::2, 1::3],
        np.asfortranarray(base.astype(">i4")),
        np.float32(2.5),
    ]

    # Execute
    decoded = decode_weights(encode_weights(weights))

    # Assert
    assert all(_same(np.asarray(w), d) for w, d in zip(weights, decoded, strict=True))
    assert all(d.dtype.byteorder in "<|=" and d.flags.c_contiguous for d in decoded)


def test_an_empty_weight_list_round_trips() -> None:
    assert decode_weights(encode_weights([])) == []


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=lambda w: w.__name__)
def test_decoded_arrays_are_read_only_views_over_the_input_buffer(wrap: Callable[[bytes], Any]) -> None:
    # Prepare
    weights = [np.ones((64, 64), np.float32), np.arange(10, dtype=np.int64)]
    buffer = wrap(encode_weights(weights))

    # Execute
    decoded = decode_weights(buffer)

    # Assert: zero copy, and the views cannot be used to corrupt the buffer
    whole = np.frombuffer(buffer, dtype=np.uint8)
    assert all(np.shares_memory(array, whole) for array in decoded)
    assert not any(array.flags.writeable for array in decoded)
    with pytest.raises(ValueError):
        decoded[0][0, 0] = 5


def test_decoded_arrays_keep_the_buffer_alive() -> None:
    # Prepare
    frame = encode_weights([np.full(1000, 7.0)])
    decoded = decode_weights(bytearray(frame))
    del frame

    # Execute
    total = float(decoded[0].sum())

    # Assert
    assert total == 7000.0


def test_frames_are_canonical_so_the_sha256_identifies_the_weights() -> None:
    # Prepare
    weights = [np.arange(5, dtype=np.float32), np.zeros((2, 2), np.uint8)]
    same_values = [np.arange(5, dtype=">f4"), np.zeros((2, 2), np.uint8).T]

    # Execute
    digests = {weights_sha256(encode_weights(w)) for w in (weights, same_values)}
    other = weights_sha256(encode_weights([np.arange(5, dtype=np.float32)]))

    # Assert
    assert len(digests) == 1 and other not in digests


def test_a_laid_out_frame_writes_the_same_bytes_as_encode() -> None:
    # Prepare
    weights: list[np.ndarray] = [np.arange(100, dtype=np.int16), np.eye(3), np.array(True)]
    frame = layout_frame(weights)
    out = bytearray(frame.nbytes + 10)

    # Execute
    written = frame.write_into(out)

    # Assert
    assert written == frame.nbytes == len(encode_weights(weights))
    assert bytes(out[:written]) == encode_weights(weights) == b"".join(frame.parts)
    assert weights_nbytes(weights) == 200 + 72 + 1


@pytest.mark.parametrize("chunk_size", [1, 63, 64, 1000, 1 << 20])
def test_a_laid_out_frame_streams_in_chunks_that_join_to_the_frame(chunk_size: int) -> None:
    # Prepare
    weights = [np.arange(300, dtype=np.float32), np.ones((7, 3), np.int8), np.array(2.0)]
    frame = layout_frame(weights)

    # Execute
    chunks = list(frame.iter_chunks(chunk_size))

    # Assert
    assert b"".join(chunks) == encode_weights(weights)
    assert all(len(chunk) == chunk_size for chunk in chunks[:-1]) and 0 < len(chunks[-1]) <= chunk_size


@st.composite
def weight_lists(draw: st.DrawFn, max_arrays: int = 5) -> list[np.ndarray]:
    dtypes = st.sampled_from(ALLOWED + [d.newbyteorder(">") for d in ALLOWED if d.itemsize > 1])
    shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
    arrays = draw(st.lists(hnp.arrays(dtypes, shapes), max_size=max_arrays))
    return [a[::-1] if a.ndim and draw(st.booleans()) else a for a in arrays]


@given(weights=weight_lists())
def test_property_any_weight_list_round_trips(weights: list[np.ndarray]) -> None:
    decoded = decode_weights(encode_weights(weights))
    assert len(decoded) == len(weights)
    assert all(_same(w, d) for w, d in zip(weights, decoded, strict=True))


# --- encode refuses what cannot travel ------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(3, dtype=np.complex128),
        np.array([object(), 1], dtype=object),
        np.array(["a", "b"]),
        np.zeros(2, dtype="datetime64[s]"),
        np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")]),
        np.zeros(2, dtype="V4"),
        [1.0, 2.0],
        "weights",
    ],
    ids=["complex", "object", "str", "datetime", "structured", "void", "list", "str-object"],
)
def test_encode_refuses_values_outside_the_allow_list(bad: object) -> None:
    with pytest.raises(EncodeError, match="weight 1"):
        encode_weights([np.zeros(1), bad])


def test_encode_refuses_weight_lists_over_the_limits() -> None:
    # Prepare
    limits = CodecLimits(max_total_bytes=1000, max_arrays=2, max_ndim=2)

    # Execute / Assert
    with pytest.raises(EncodeError, match="arrays exceed"):
        encode_weights([np.zeros(1)] * 3, limits=limits)
    with pytest.raises(EncodeError, match="dimensions exceed"):
        encode_weights([np.zeros((1, 1, 1))], limits=limits)
    with pytest.raises(EncodeError, match="exceed the limit of 1000"):
        encode_weights([np.zeros(100), np.zeros(100)], limits=limits)


# --- decode refuses malformed frames with a clear message -----------------------------------------


def _entry(dtype: str, shape: list[int], offset: int, nbytes: int) -> list[object]:
    return [dtype, shape, offset, nbytes]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than the 12-byte prefix"),
        (b"NOPE" + bytes(60), "bad magic"),
        (pickle.dumps(np.zeros(3)), "pickle"),
        (b"FMQW\x02" + bytes(59), "unsupported format version 2"),
        (b"FMQW\x01\x00\x01\x00" + bytes(56), "reserved"),
        (b"FMQW\x01\x00\x00\x00\x00\x00\x00\x02", "exceeds the limit"),
        (b"FMQW\x01\x00\x00\x00\x10\x00\x00\x00", "truncated"),
        (_frame([1, 2, 3]), "must be a map"),
        (_frame({"v": 1, "arrays": [], "data": 0, "x": 1}), "must be a map with keys"),
        (_frame({"v": 2, "arrays": [], "data": 0}), "header version 2"),
        (_frame({"v": True, "arrays": [], "data": 0}), "header version True"),
        (_frame({"v": 1, "arrays": [], "data": -1}), "data size -1"),
        (
            _frame({"v": 1, "arrays": [["|O", [1], 0, 8]], "data": 8}, bytes(8)),
            "array 0: dtype '|O' is not allowed",
        ),
        (
            _frame({"v": 1, "arrays": [["float32", [1], 0, 4]], "data": 4}, bytes(4)),
            "dtype 'float32' is not allowed",
        ),
        (_frame({"v": 1, "arrays": [[">f4", [1], 0, 4]], "data": 4}, bytes(4)), "dtype '>f4' is not allowed"),
        (_frame({"v": 1, "arrays": [["<f4", [-1], 0, 4]], "data": 4}, bytes(4)), "non-negative ints"),
        (_frame({"v": 1, "arrays": [["<f4", [1.0], 0, 4]], "data": 4}, bytes(4)), "non-negative ints"),
        (_frame({"v": 1, "arrays": [["<f4", [2], 0, 4]], "data": 4}, bytes(4)), "nbytes 4 does not match"),
        (_frame({"v": 1, "arrays": [["<f4", [1], 8, 4]], "data": 12}, bytes(12)), "offset 8 is not"),
        (_frame({"v": 1, "arrays": [["<f4", [1], 0, 4]], "data": 8}, bytes(8)), r"do(es)? not match"),
        (_frame({"v": 1, "arrays": [["<f4", [1], 0, 4]], "data": 4}, bytes(5)), "header implies"),
        (_frame({"v": 1, "arrays": [["<f4", [1], 0, 4]], "data": 4}), "header implies"),
        (_frame({"v": 1, "arrays": [["<f4", [1], 0, 4]], "data": 4}, bytes(4), pad=False), "header implies"),
        (_frame({"v": 1, "arrays": [[b"<f4", [1], 0, 4]], "data": 4}, bytes(4)), "dtype must be a string"),
        (
            _frame({"v": 1, "arrays": [["<f8", [2**40], 0, 2**43]], "data": 2**43}, bytes(36)),
            "over the limit",
        ),
        (_frame({"v": 1, "arrays": [["|u1", [0, 2**62], 0, 0]], "data": 0}), "over the limit"),
        (_frame({"v": 1, "arrays": [["|u1", [1] * 33, 0, 1]], "data": 1}, b"\0"), "33 dimensions exceed"),
        (_frame({"v": 1, "arrays": [msgpack.ExtType(1, b"x")], "data": 0}), "not valid msgpack"),
        (_frame({"v": 1, "arrays": [], "data": 0}) + b"\0", "header implies"),
        (_frame({"data": 0, "v": 1, "arrays": []}), "canonical"),
    ],
)
def test_decode_rejects_malformed_frames_with_a_clear_message(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_weights(data)


def test_decode_rejects_non_zero_padding_and_non_minimal_msgpack() -> None:
    # Prepare
    frame = bytearray(encode_weights([np.ones(3, np.float32), np.ones(3, np.float32)]))
    header_len = struct.unpack_from("<I", frame, 8)[0]
    data_start = len(frame) - 64 - 12  # the second array sits 64 bytes in, after a 52-byte gap
    in_header_padding, in_data_gap = 12 + header_len, data_start + 12 + 20
    variants: list[bytes] = []
    for position in (in_header_padding, in_data_gap):
        variant = bytearray(frame)
        variant[position] = 1
        variants.append(bytes(variant))
    long_int = b"\x83\xa1v\xcc\x01\xa6arrays\x90\xa4data\x00"  # {"v": uint8 1, ...}
    variants.append(struct.pack("<4sB3sI", b"FMQW", 1, b"\0\0\0", len(long_int)) + long_int + bytes(33))

    # Execute / Assert
    for hostile in variants:
        with pytest.raises(DecodeError, match=r"padding|canonical"):
            decode_weights(hostile)


def test_a_header_checked_once_still_has_every_frame_and_every_limit_checked() -> None:
    # Prepare: the deltas of one model share a header, which is validated once (codec cache);
    # the padding is each frame's own, and the limits are each caller's own.
    weights = [np.ones(3, np.float32), np.ones(3, np.float32)]
    frame = bytearray(encode_weights(weights))
    for _ in range(3):
        decode_weights(bytes(frame))  # the header is known now
    data_start = len(frame) - 64 - 12
    dirty = bytearray(frame)
    dirty[data_start + 12 + 20] = 1  # the gap between the two arrays
    other = bytearray(encode_weights([np.full(3, 2.0, np.float32), np.full(3, 5.0, np.float32)]))

    # Execute / Assert
    with pytest.raises(DecodeError, match="padding"):
        decode_weights(bytes(dirty))
    with pytest.raises(DecodeError, match="2 arrays exceed the limit of 1"):
        decode_weights(bytes(frame), limits=CodecLimits(max_arrays=1))
    with pytest.raises(DecodeError, match="frame is"):
        decode_weights(bytes(frame) + b"\0" * 64)  # same header, more data than it declares
    assert [a.tolist() for a in decode_weights(bytes(other))] == [[2.0] * 3, [5.0] * 3]


def test_decode_applies_the_callers_tighter_limits() -> None:
    # Prepare
    frame = encode_weights([np.zeros((4, 4), np.float32)] * 3)

    # Execute / Assert
    with pytest.raises(DecodeError, match="3 arrays exceed the limit of 2"):
        decode_weights(frame, limits=CodecLimits(max_arrays=2))
    with pytest.raises(DecodeError, match="over the limit of 32"):
        decode_weights(frame, limits=CodecLimits(max_total_bytes=32))
    with pytest.raises(DecodeError, match="2 dimensions exceed the limit of 1"):
        decode_weights(frame, limits=CodecLimits(max_ndim=1))
    with pytest.raises(DecodeError, match=r"header of \d+ bytes exceeds the limit of 8"):
        decode_weights(frame, limits=CodecLimits(max_header_bytes=8))


@pytest.mark.parametrize(
    "data", ["text", 42, None, np.zeros((4, 4))[:, ::2]], ids=["str", "int", "none", "strided"]
)
def test_decode_rejects_non_bytes_input(data: Any) -> None:
    with pytest.raises(DecodeError, match=r"bytes-like|not contiguous"):
        decode_weights(data)


# --- pickle is never touched ----------------------------------------------------------------------


def test_msgpack_numpy_and_pickle_payloads_are_rejected_without_unpickling(no_pickle: list[str]) -> None:
    # Prepare: what msgpack-numpy sends for an object array, and a raw pickle stream
    payload = {b"nd": True, b"type": "<f8", b"kind": b"O", b"shape": [2], b"data": pickle.dumps([1.0, 2.0])}
    ext_payload = msgpack.packb([msgpack.ExtType(42, pickle.dumps(np.zeros(2)))])
    hostile = [
        msgpack.packb(payload),
        _frame(payload),
        _frame({"v": 1, "arrays": [payload], "data": 0}),
        _frame({"v": 1, "arrays": [], "data": 0, "ext": msgpack.ExtType(1, b"\x80\x04.")}),
        ext_payload,
        pickle.dumps(np.arange(3)),
        pickle.dumps([np.arange(3)], protocol=2),
    ]

    # Execute / Assert
    for data in hostile:
        with pytest.raises(DecodeError):
            decode_weights(data)
    with pytest.raises(DecodeError, match="must be a map with keys"):
        array_from_wire(payload)
    assert no_pickle == []


# --- garbage: only DecodeError, never a large allocation ------------------------------------------


def test_the_allocation_probe_sees_numpy_allocations() -> None:
    tracemalloc.start()
    try:
        big = np.ones(1 << 22, np.uint8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert big.nbytes == 1 << 22 and peak >= 1 << 22


def test_a_100_byte_frame_claiming_a_huge_array_allocates_nothing_large() -> None:
    # Prepare: without a total limit the header is consistent except for the frame length
    limits = CodecLimits(max_total_bytes=2**62)
    claim = _frame({"v": 1, "arrays": [["<f8", [2**40], 0, 2**43]], "data": 2**43})
    claim += bytes(100 - len(claim))

    # Execute
    outcome, peak = _decode_outcome(claim, limits)

    # Assert
    assert outcome == "DecodeError" and peak < SMALL_INPUT_PEAK


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048))
def test_property_random_bytes_only_raise_decode_error(data: bytes) -> None:
    outcome, peak = _decode_outcome(data)
    assert outcome == "DecodeError" and peak < SMALL_INPUT_PEAK


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(weights=weight_lists(max_arrays=3), data=st.data())
def test_property_mutated_frames_only_raise_decode_error(
    weights: list[np.ndarray], data: st.DataObject
) -> None:
    # Prepare: a bit flip (mostly in prefix and header), a truncation, an extension or a splice
    frame = bytearray(encode_weights(weights))
    header_end = 12 + struct.unpack_from("<I", frame, 8)[0]
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice", "prefix"]))
    if kind == "flip":
        position = data.draw(st.integers(0, min(len(frame), header_end + 64) - 1))
        frame[position] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        del frame[data.draw(st.integers(0, len(frame) - 1)) :]
    elif kind == "extend":
        frame += data.draw(st.binary(min_size=1, max_size=128))
    elif kind == "splice":
        position = data.draw(st.integers(0, len(frame)))
        frame[position:position] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        frame[8:12] = struct.pack("<I", data.draw(st.integers(0, 2**32 - 1)))

    # Execute
    outcome, peak = _decode_outcome(bytes(frame))

    # Assert: decoding a mutation may succeed (e.g. a flipped data bit), but only ever fails cleanly
    assert outcome in {"ok", "DecodeError"} and peak < SMALL_INPUT_PEAK


_HUGE_INTS = st.sampled_from([0, 1, 4, 64, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1, -1, -(2**63)])
_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.floats()
    | _HUGE_INTS
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from([*ALLOWED_DTYPES, "|O", "<c16", "<M8[s]", "|V4"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_ENTRIES = st.tuples(
    st.sampled_from(list(ALLOWED_DTYPES)) | _VALUES,
    st.lists(_HUGE_INTS | st.integers(0, 9), max_size=6) | _VALUES,
    _HUGE_INTS | _VALUES,
    _HUGE_INTS | _VALUES,
).map(list)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.lists(_ENTRIES | _VALUES, max_size=4),
    total=_HUGE_INTS | _VALUES,
    extra=st.dictionaries(st.sampled_from(["v", "x"]), _VALUES, max_size=1),
    data_len=st.integers(0, 512),
)
def test_property_crafted_headers_only_raise_decode_error(
    entries: list[object], total: object, extra: dict[str, object], data_len: int
) -> None:
    # Prepare: any header shape, with claims of huge arrays and lengths, over a small data region
    header: dict[str, object] = {"v": 1, "arrays": entries, "data": total, **extra}

    # Execute
    outcome, peak = _decode_outcome(_frame(header, bytes(data_len)))

    # Assert
    assert outcome in {"ok", "DecodeError"} and peak < SMALL_INPUT_PEAK


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(weights=weight_lists(max_arrays=3).filter(bool), data=st.data())
def test_property_one_edited_header_field_only_raises_decode_error(
    weights: list[np.ndarray], data: st.DataObject
) -> None:
    # Prepare: a valid frame whose header has one field of one entry (or the data size) replaced
    frame = encode_weights(weights)
    header_len = struct.unpack_from("<I", frame, 8)[0]
    header = msgpack.unpackb(frame[12 : 12 + header_len])
    start = 12 + header_len + (-(12 + header_len) % 64)
    replacement = data.draw(_HUGE_INTS | st.integers(-(2**63), 2**64 - 1) | _VALUES)
    index = data.draw(st.integers(0, len(weights)))
    if index == len(weights):
        header["data"] = replacement
    else:
        header["arrays"][index][data.draw(st.integers(0, 3))] = replacement
    edited = _frame(header, frame[start:])

    # Execute
    outcome, peak = _decode_outcome(edited)

    # Assert
    assert outcome in {"ok", "DecodeError"} and peak < SMALL_INPUT_PEAK


# --- arrays inside msgpack messages ---------------------------------------------------------------


def test_wire_arrays_round_trip_through_msgpack_as_views() -> None:
    # Prepare
    original = np.arange(12, dtype=">i4").reshape(3, 4).T
    body = msgpack.packb({"w": array_to_wire(original)})

    # Execute
    wire = msgpack.unpackb(body, raw=False)["w"]
    decoded = array_from_wire(wire, where="delta.w")

    # Assert
    assert _same(original, decoded) and not decoded.flags.writeable
    assert np.shares_memory(decoded, np.frombuffer(wire["data"], np.uint8))


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"dtype": "<f4", "shape": [2], "data": bytes(4)}, r"delta.w: data is 4 bytes, .* needs 8"),
        ({"dtype": "|O", "shape": [1], "data": bytes(8)}, "delta.w: dtype '|O' is not allowed"),
        ({"dtype": "<f4", "shape": [2**40, 2**40], "data": b""}, "over the limit"),
        ({"dtype": "<f4", "shape": [1], "data": "abcd"}, "data must be binary"),
        ({"dtype": "<f4", "shape": (1,), "data": bytes(4)}, "shape must be a list"),
        ({"dtype": "<f4", "shape": [1]}, "must be a map with keys"),
        ([1, 2, 3], "must be a map with keys"),
    ],
)
def test_wire_arrays_reject_malformed_maps(obj: object, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        array_from_wire(obj, where="delta.w")


def test_array_to_wire_refuses_forbidden_dtypes() -> None:
    with pytest.raises(EncodeError, match="complex"):
        array_to_wire(np.zeros(2, np.complex64))


# --- the benchmark --------------------------------------------------------------------------------


def test_benchmark_layers_look_like_a_conv_net_of_the_requested_size() -> None:
    # Execute
    layers = realistic_layer_shapes(100_000_000)

    # Assert
    total = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in layers)
    assert abs(total - 100_000_000) < 100_000
    assert any(len(shape) == 4 and shape[:2] == (3, 3) for shape, _ in layers)
    assert [dtype for shape, dtype in layers if shape == ()] == ["int64", "int64"]


def test_fedmq_bench_codec_prints_ratios_as_json() -> None:
    # Prepare
    from coordinator.cli.main import app

    # Execute
    result = CliRunner().invoke(app, ["bench", "codec", "--size-mb", "2", "--repeat", "1", "--json"])

    # Assert
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["encode_decode_ratio"] > 0 and figures["decode_ratio"] > 0
    assert isinstance(figures["encode_decode_target_met"], bool) and isinstance(
        figures["decode_target_met"], bool
    )
    assert figures["arrays"] > 2 and figures["size_mb"] == pytest.approx(2, rel=0.01)


def test_fedmq_bench_codec_prints_a_table_with_the_targets() -> None:
    from coordinator.cli.main import app

    result = CliRunner().invoke(app, ["bench", "codec", "--size-mb", "1", "--repeat", "1"])

    assert result.exit_code == 0, result.output
    assert "encode+decode / copy" in result.stdout and "target >= 10x" in result.stdout
