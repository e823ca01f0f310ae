"""Hostile input: every decoder a worker (or anyone on the broker) can reach, fuzzed with hypothesis.

Three promises, checked on every example:

- **only our errors**: a decoder returns or raises a :class:`~common.errors.FedmqError`; any other
  exception escapes :func:`attempt` and fails the test (hypothesis then shrinks the input);
- **bounded memory**: the tracemalloc peak of one call stays small for a small input, including
  crafted headers that claim gigabytes;
- **never code execution**: while a decoder runs, ``pickle.loads/load``, ``dill.loads/load``,
  ``marshal.loads``, ``exec``, ``eval``, ``os.system`` and fedmq's own ``compile_function`` are
  replaced by spies that raise a :class:`BaseException` (so no ``except Exception`` in a decoder
  can swallow the alarm).

Set ``FEDMQ_RELIABILITY_FIGURES=path.json`` to write the figures (examples and peak memory per
decoder) that docs/reliability.md quotes. The ``slow`` twins (``FEDMQ_LONG_TESTS=1``) run 20x
the examples. ``python -m tests.unit.test_hostile_input atheris [-runs=N] [--corpus=DIR]`` drives the coordinator's
intake with atheris (coverage-guided) when it is installed.
"""

from __future__ import annotations

import builtins
import contextlib
import decimal
import hashlib
import json
import marshal
import os
import pickle
import posix
import struct
import sys
import tempfile
import tracemalloc
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, Union

import dill
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import codec, keyfiles, signing
from common.broker.chunks import CHUNK_HEADERS, ChunkHeader, Reassembler, split_body
from common.errors import FedmqError, SignatureError, TransferError
from common.messages import (
    _REGISTRY,
    DeltaReport,
    JobResult,
    Message,
    ModelRelease,
    SubmitJob,
    decode,
)
from common.model import blob as model_blob
from common.model import dynamic as model_dynamic
from common.model import source as model_source
from common.model.bundle import ModelCode, split_model
from common.model.numpy_model import make_linear_model
from common.release import (
    CODE_ENVELOPE_VERSION,
    KIND_MODEL_WEIGHTS,
    VerifiedRelease,
    build_release,
    open_release,
    parse_manifest,
    version_manifest,
)

FAST_EXAMPLES = 300
SLOW_EXAMPLES = 6000
PER_TYPE_EXAMPLES = 100
KIB, MIB = 1024, 1024 * 1024
#: What a coordinator decodes a delta with (record_delta bounds it by the base version's size).
INTAKE_LIMITS = codec.CodecLimits(max_total_bytes=1 * MIB, max_arrays=64)
MESSAGE_TYPES: list[type[Message]] = sorted(_REGISTRY.values(), key=lambda cls: cls.TYPE)
PWNED = Path(tempfile.gettempdir()) / f"fedmq-pwned-{os.getpid()}"


# ------------------------------------------------------------------------- the three promises


class CodeExecutionAttempt(BaseException):
    """Raised by a spy: a decoder tried to unpickle, exec, eval or compile something."""


def _forbidden() -> list[tuple[Any, str]]:
    return [
        (pickle, "loads"),
        (pickle, "load"),
        (pickle, "Unpickler"),
        (dill, "loads"),
        (dill, "load"),
        (dill._dill, "loads"),
        (marshal, "loads"),
        (builtins, "exec"),
        (builtins, "eval"),
        (os, "system"),
        (posix, "system"),  # what a pickled os.system resolves to
        (model_source, "compile_function"),
        (model_dynamic, "compile_function"),
        (model_blob, "compile_function"),
    ]


def _spy(calls: list[str], name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def spy(*args: Any, **kwargs: Any) -> Any:
        if name == "builtins.eval" and sys._getframe(1).f_code.co_filename.endswith("typing.py"):
            # typing.get_type_hints evaluates the message classes' own annotations (our source text).
            return original(*args, **kwargs)
        calls.append(name)
        raise CodeExecutionAttempt(f"{name} called with {args!r:.200}")

    return spy


@contextlib.contextmanager
def no_code_execution() -> Iterator[list[str]]:
    """Replace every way to run code from data by a spy; fail if one was called."""
    calls: list[str] = []
    saved = [(owner, name, getattr(owner, name)) for owner, name in _forbidden()]
    for owner, name, original in saved:
        setattr(owner, name, _spy(calls, f"{owner.__name__}.{name}", original))
    try:
        yield calls
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    assert not calls, f"code execution attempted: {calls}"


@dataclass
class DecoderFigures:
    examples: int = 0
    max_input: int = 0
    peak_bytes: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


FIGURES: dict[str, DecoderFigures] = {}


def attempt(decoder: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run ``fn`` under the spies and tracemalloc: (its result or its FedmqError, peak bytes).

    Any exception that is not a FedmqError propagates: that is the test failing.
    """
    # Traced only during the call: hypothesis' own generation runs at full speed.
    already = tracemalloc.is_tracing()
    if already:
        tracemalloc.reset_peak()
    else:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    try:
        with no_code_execution():
            try:
                result: Any = fn(*args, **kwargs)
            except FedmqError as exc:
                result = exc
        peak = max(0, tracemalloc.get_traced_memory()[1] - base)
    finally:
        if not already:
            tracemalloc.stop()
    figures = FIGURES.setdefault(decoder, DecoderFigures())
    buffers = [getattr(a, "payload", b"") if isinstance(a, Message) else a for a in args]
    size = max((len(a) for a in buffers if isinstance(a, bytes | bytearray | memoryview)), default=0)
    figures.examples += 1
    figures.max_input = max(figures.max_input, size)
    figures.peak_bytes = max(figures.peak_bytes, peak)
    figures.outcomes[type(result).__name__ if isinstance(result, FedmqError) else "accepted"] += 1
    return result, peak


def small_input_bound(size: int) -> int:
    """The most a decoder may allocate for ``size`` input bytes (the message unpacker's 256 KiB
    buffer, plus a few times the input)."""
    return 1 * MIB + 64 * size


@pytest.fixture(scope="module", autouse=True)
def figures_file() -> Iterator[None]:
    yield
    out = os.environ.get("FEDMQ_RELIABILITY_FIGURES")
    if out:
        report = {
            name: {
                "examples": f.examples,
                "max_input_bytes": f.max_input,
                "peak_bytes": f.peak_bytes,
                "outcomes": dict(f.outcomes.most_common()),
            }
            for name, f in sorted(FIGURES.items())
        }
        Path(out).write_text(json.dumps(report, indent=2))


BASE_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz(*strategies: st.SearchStrategy[Any]) -> Callable[[Callable[..., None]], tuple[Any, Any]]:
    """A property as two tests: FAST_EXAMPLES examples, and a ``slow`` twin with SLOW_EXAMPLES."""

    def wrap(prop: Callable[..., None]) -> tuple[Any, Any]:
        fast = settings(BASE_SETTINGS, max_examples=FAST_EXAMPLES)(given(*strategies)(prop))
        slow = settings(BASE_SETTINGS, max_examples=SLOW_EXAMPLES)(given(*strategies)(prop))
        return fast, pytest.mark.slow(slow)

    return wrap


# ------------------------------------------------------------------------------ hostile payloads


class Evil:
    """Unpickling this runs a shell command (it would create PWNED)."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {PWNED}",)


def evil_pickles() -> dict[str, bytes]:
    streams = {f"pickle-p{p}-os.system": pickle.dumps(Evil(), protocol=p) for p in (0, 2, 4, 5)}
    streams["dill-lambda"] = dill.dumps(lambda: os.system(f"touch {PWNED}"), recurse=True)
    streams["marshal-code"] = marshal.dumps(compile("import os", "<evil>", "exec"))
    return streams


def msgpack_numpy_payload(keys: type = bytes) -> dict[Any, Any]:
    """What msgpack-numpy writes for an object array: naive decoders unpickle ``data``."""
    k: Callable[[str], Any] = (lambda s: s.encode()) if keys is bytes else (lambda s: s)
    return {
        k("nd"): True,
        k("type"): k("|O"),
        k("kind"): k("O"),
        k("shape"): [1],
        k("data"): pickle.dumps(Evil()),
    }


def hostile_values() -> dict[str, Any]:
    """Values that would run code in a naive msgpack decoder (ext hooks, msgpack-numpy)."""
    evil = pickle.dumps(Evil())
    return {
        "msgpack-numpy(bytes keys)": msgpack_numpy_payload(bytes),
        "msgpack-numpy(str keys)": msgpack_numpy_payload(str),
        "ext1-pickle": msgpack.ExtType(1, evil),
        "ext0x78-pickle": msgpack.ExtType(0x78, evil),
        "ext0-pickle": msgpack.ExtType(0, evil),
        "ext-1-timestamp": msgpack.Timestamp(1, 0),
        "ext127-empty": msgpack.ExtType(127, b""),
    }


def hostile_bodies() -> dict[str, bytes]:
    """Whole bodies: raw pickles, msgpack-numpy maps and ext types at the top level."""
    bodies = dict(evil_pickles())
    for name, value in hostile_values().items():
        bodies[f"top-level {name}"] = msgpack.packb(value, use_bin_type=True)
    return bodies


def delta_fields() -> dict[str, Any]:
    return {
        "v": 1,
        "type": DeltaReport.TYPE,
        "task_id": "t1",
        "round_id": 1,
        "worker": "w1",
        "model": "m",
        "base_version": 1,
        "base_weights_sha256": "0" * 64,
        "sample_count": 10,
        "metrics": {},
    }


def delivered_as_delta(payload: bytes) -> bytes:
    """``payload`` as the raw tail of a well-formed DeltaReport (what the coordinator decodes)."""
    head = msgpack.packb({**delta_fields(), "payload": len(payload)}, use_bin_type=True)
    return head + payload


def delivered_in_fields(value: Any) -> dict[str, bytes]:
    """``value`` inside a DeltaReport's map: as a metric, as a field, as the payload count."""
    out = {}
    for where, patch in (
        ("metrics value", {"metrics": {"loss": value}}),
        ("metrics map", {"metrics": value}),
        ("task_id", {"task_id": value}),
        ("payload size", {"payload": value}),
        ("extra field", {"nd": value}),
    ):
        fields_ = {**delta_fields(), "payload": 0, **patch}
        out[where] = msgpack.packb(fields_, use_bin_type=True)
    return out


def coordinator_intake(body: bytes | memoryview) -> Message:
    """What the coordinator does with a body from the results/fetch queues: decode, then the weights."""
    message: Message = decode(body)
    if isinstance(message, DeltaReport | JobResult | SubmitJob) and len(message.payload):
        codec.decode_weights(message.payload, limits=INTAKE_LIMITS)
    return message


# ----------------------------------------------------------------------------- valid material


@cache
def signing_key() -> Any:
    return keyfiles.generate_key()


@cache
def other_key() -> Any:
    return keyfiles.generate_key()


@dataclass(frozen=True)
class GoodRelease:
    release: ModelRelease
    code: ModelCode
    weights: list[np.ndarray]
    code_envelope: bytes
    manifest_envelope: bytes
    frame: bytes


@cache
def good_release() -> GoodRelease:
    key = signing_key()
    code, weights = split_model(make_linear_model(4, 3))
    code_bytes, frame = code.to_bytes(), codec.encode_weights(weights)
    code_env = signing.seal(
        code_bytes, key=key, kind=signing.KIND_MODEL_CODE, model_id="m", version=CODE_ENVELOPE_VERSION
    )
    manifest = version_manifest(
        "m", 2, 1, hashlib.sha256(frame).hexdigest(), len(frame), hashlib.sha256(code_bytes).hexdigest()
    )
    manifest_env = signing.seal(manifest, key=key, kind=KIND_MODEL_WEIGHTS, model_id="m", version=2)
    release = build_release(
        "m",
        2,
        code_env,
        manifest_env,
        frame,
        hashlib.sha256(code_bytes).hexdigest(),
        hashlib.sha256(frame).hexdigest(),
    )
    return GoodRelease(release, code, weights, code_env, manifest_env, frame)


ARRAY_DTYPES = st.sampled_from(["bool", "int8", "uint16", "int32", "int64", "float16", "float32", "float64"])


@st.composite
def weight_lists(draw: st.DrawFn) -> list[np.ndarray]:
    out = []
    for _ in range(draw(st.integers(0, 4))):
        dtype = np.dtype(draw(ARRAY_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        raw = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize, max_size=4096))
        n = int(np.prod(shape))
        out.append(np.frombuffer(raw[: n * dtype.itemsize], dtype=dtype).reshape(shape))
    return out


frames = weight_lists().map(codec.encode_weights)

JSON_LIKE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
#: Anything msgpack carries, including non-finite floats (for forged, not valid, bodies).
ANY_VALUE = JSON_LIKE | st.floats() | st.sampled_from([float("nan"), float("inf")])


def strategy_for(hint: Any) -> st.SearchStrategy[Any]:
    """Values of a message field's declared type (the subset messages use)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return st.one_of(*[strategy_for(arg) for arg in typing.get_args(hint)])
    if hint is type(None):
        return st.none()
    if hint is str:
        return st.text(max_size=24)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(-(2**63), 2**64 - 1)
    if hint is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if origin is list:
        return st.lists(strategy_for(typing.get_args(hint)[0]), max_size=4)
    if origin is dict:
        key, value = typing.get_args(hint)
        return st.dictionaries(strategy_for(key), strategy_for(value), max_size=4)
    if hint is Any:
        return JSON_LIKE
    raise AssertionError(f"no strategy for {hint}")


def messages_of(cls: type[Message]) -> st.SearchStrategy[Message]:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, st.SearchStrategy[Any]] = {}
    for f in fields(cls):
        if f.name == "payload":
            kwargs["payload"] = (
                frames | st.binary(max_size=256) | st.sampled_from(list(evil_pickles().values()))
            )
        else:
            kwargs[f.name] = strategy_for(hints[f.name])
    return st.builds(cls, **kwargs)


any_message = st.sampled_from(MESSAGE_TYPES).flatmap(messages_of)

#: Byte sequences that make msgpack (or our prefixes) claim huge sizes or odd types.
INTERESTING = [
    b"\xdd\xff\xff\xff\xff",  # array32 of 4G items
    b"\xdf\xff\xff\xff\xff",  # map32 of 4G pairs
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xc9\xff\xff\xff\xff\x01",  # ext32 type 1 of 4 GiB
    b"\xc7\x00\x01",  # ext8 of length 0, type 1
    b"\xd6\xff\x00\x00\x00\x00",  # timestamp ext -1
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # uint64 max
    b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",  # int64 min
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # float64 NaN
    b"\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # float64 +inf
    b"\xc1",  # never used
    b"\xff\xff\xff\xff",  # u32 prefix lengths
    b"\x80\x05\x95",  # pickle protocol 5 opening
]


@st.composite
def mutations_of(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with 1..4 edits: bit flips, overwrites, inserted/deleted bytes, cuts, size bombs."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "bomb", "append"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        elif op == "bomb":
            bomb = draw(st.sampled_from(INTERESTING))
            data[at : at + len(bomb)] = bomb
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def bodies_of(base: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Valid bytes, mutated valid bytes, and plain random bytes."""
    return st.one_of(base, base.flatmap(mutations_of), st.binary(max_size=512))


def assert_bounded(peak: int, size: int) -> None:
    assert peak <= small_input_bound(size), f"{peak} bytes allocated for {size} input bytes"


# ------------------------------------------------------------------------------ the spies work


def test_the_spies_catch_a_naive_decoder():
    body = pickle.dumps(Evil())
    with pytest.raises(CodeExecutionAttempt, match=r"pickle\.loads"), no_code_execution():
        pickle.loads(body)
    with pytest.raises(CodeExecutionAttempt, match=r"dill\.loads"), no_code_execution():
        dill.loads(dill.dumps(1))
    with pytest.raises(CodeExecutionAttempt, match="compile_function"), no_code_execution():
        model_dynamic.compile_function("def f():\n    return 1\n", "f")
    assert not PWNED.exists()


# ------------------------------------------------------------------------------ messages.decode


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.TYPE)
@settings(BASE_SETTINGS, max_examples=PER_TYPE_EXAMPLES)
@given(data=st.data())
def test_every_valid_message_round_trips(cls: type[Message], data: st.DataObject):
    message = data.draw(messages_of(cls))
    body = message.encode()

    decoded, peak = attempt("messages.decode", decode, body)

    assert not isinstance(decoded, FedmqError), decoded
    assert type(decoded) is cls
    for f in fields(cls):
        expected, got = getattr(message, f.name), getattr(decoded, f.name)
        assert (bytes(got) if f.name == "payload" else got) == expected
    assert_bounded(peak, len(body))


def _check_message_body(body: bytes) -> None:
    result, peak = attempt("messages.decode", decode, body)
    assert isinstance(result, Message | FedmqError)
    intake, intake_peak = attempt("coordinator intake (decode + weights)", coordinator_intake, body)
    assert isinstance(intake, Message | FedmqError)
    assert_bounded(max(peak, intake_peak), len(body))


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.TYPE)
@settings(BASE_SETTINGS, max_examples=PER_TYPE_EXAMPLES)
@given(data=st.data())
def test_mutated_messages_of_every_type_give_only_decode_errors(cls: type[Message], data: st.DataObject):
    body = data.draw(messages_of(cls).map(lambda m: m.encode()).flatmap(mutations_of))
    _check_message_body(body)


@st.composite
def forged_maps(draw: st.DrawFn) -> bytes:
    """Maps shaped like messages with fields of any type (and extra/missing ones)."""
    cls = draw(st.sampled_from(MESSAGE_TYPES))
    head: dict[Any, Any] = {"v": draw(st.sampled_from([1, 1, 0, 2, "1", None])), "type": cls.TYPE}
    for f in fields(cls):
        if draw(st.integers(0, 9)) > 0:
            head[f.name] = draw(ANY_VALUE)
    head.update(draw(st.dictionaries(st.text(max_size=6) | st.binary(max_size=4), ANY_VALUE, max_size=2)))
    tail = draw(st.binary(max_size=32))
    head["payload"] = draw(st.sampled_from([len(tail), len(tail) + 1, -1, 2**63, None]))
    return msgpack.packb(head, use_bin_type=True) + tail


test_decode_fuzz, test_decode_fuzz_long = fuzz(
    bodies_of(any_message.map(lambda m: m.encode())) | forged_maps()
)(_check_message_body)


@pytest.mark.parametrize("name", sorted(hostile_bodies()))
def test_hostile_top_level_bodies_are_refused_without_running_code(name: str):
    body = hostile_bodies()[name]

    result, peak = attempt("messages.decode (hostile)", coordinator_intake, body)

    assert isinstance(result, FedmqError), result
    assert peak < 1 * MIB and not PWNED.exists()


@pytest.mark.parametrize("name", sorted({**evil_pickles(), **{k: b"" for k in hostile_values()}}))
def test_hostile_payloads_in_a_delta_report_are_refused_without_running_code(name: str):
    values = hostile_values()
    payload = evil_pickles().get(name) or msgpack.packb(values[name], use_bin_type=True)
    bodies = {"payload": delivered_as_delta(payload)}
    if name in values:
        bodies.update(delivered_in_fields(values[name]))

    for where, body in bodies.items():
        result, peak = attempt("messages.decode (hostile)", coordinator_intake, body)

        assert isinstance(result, FedmqError), (where, result)
        assert peak < 1 * MIB, where
    assert not PWNED.exists()


def test_a_hostile_delta_payload_passes_decode_but_not_the_weight_codec():
    body = delivered_as_delta(pickle.dumps(Evil()))

    report, _ = attempt("messages.decode (hostile)", decode, body)
    weights, _ = attempt("codec.decode_weights (hostile)", codec.decode_weights, report.payload)

    assert isinstance(report, DeltaReport)
    assert isinstance(weights, FedmqError) and "pickle stream, which fedmq never loads" in str(weights)


def test_deeply_nested_options_are_a_decode_error():
    nested: Any = 1
    for _ in range(900):
        nested = [nested]
    body = msgpack.packb(
        {"v": 1, "type": "heartbeat", "worker": "w", "sent_at": 1.0, "info": {"a": nested}, "payload": 0}
    )

    result, _ = attempt("messages.decode", decode, body)

    assert isinstance(result, FedmqError) and "nested deeper" in str(result)


# ------------------------------------------------------------------------------------- codec


def _check_frame(data: bytes) -> None:
    result, peak = attempt("codec.decode_weights", codec.decode_weights, data, limits=INTAKE_LIMITS)
    if not isinstance(result, FedmqError):
        assert sum(a.nbytes for a in result) <= len(data)  # views over the input, never more
        assert all(not a.flags.writeable and a.dtype.kind in "biuf" for a in result)
    assert_bounded(peak, len(data))


test_decode_weights_fuzz, test_decode_weights_fuzz_long = fuzz(bodies_of(frames))(_check_frame)


@settings(BASE_SETTINGS, max_examples=FAST_EXAMPLES)
@given(weight_lists())
def test_valid_frames_decode_to_the_same_arrays(weights: list[np.ndarray]):
    frame = codec.encode_weights(weights)

    result, _ = attempt("codec.decode_weights", codec.decode_weights, frame)

    assert not isinstance(result, FedmqError)
    assert [(a.dtype.str, a.shape, a.tobytes()) for a in result] == [
        (w.dtype.newbyteorder("<").str, w.shape, w.astype(w.dtype.newbyteorder("<")).tobytes())
        for w in weights
    ]


valid_wire_arrays = weight_lists().filter(bool).map(lambda ws: codec.array_to_wire(ws[0]))


@st.composite
def mutated_wire_arrays(draw: st.DrawFn) -> dict[str, Any]:
    wire: dict[str, Any] = dict(draw(valid_wire_arrays))
    name = draw(st.sampled_from(["dtype", "shape", "data"]))
    wire[name] = draw(ANY_VALUE) if name != "data" else draw(mutations_of(wire["data"]))
    return wire


WIRE_VALUES = st.one_of(
    valid_wire_arrays,
    mutated_wire_arrays(),
    ANY_VALUE,
    st.sampled_from(list(hostile_values().values())),
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from([*codec.ALLOWED_DTYPES, "|O", "<V8", ">f4", "<U4", "|S3", "O"])
            | JSON_LIKE,
            "shape": st.lists(st.integers(-2, 2**63) | st.sampled_from([2**31, 2**62]), max_size=5)
            | JSON_LIKE,
            "data": st.binary(max_size=64) | JSON_LIKE | st.sampled_from([pickle.dumps(Evil())]),
        }
    ),
)


def _check_wire(obj: Any) -> None:
    result, peak = attempt("codec.array_from_wire", codec.array_from_wire, obj, limits=INTAKE_LIMITS)
    if not isinstance(result, FedmqError):
        assert result.dtype.kind in "biuf" and not result.flags.writeable
    assert peak < 1 * MIB


test_array_from_wire_fuzz, test_array_from_wire_fuzz_long = fuzz(WIRE_VALUES)(_check_wire)


def test_msgpack_numpy_arrays_are_refused_by_array_from_wire():
    for name in ("msgpack-numpy(bytes keys)", "msgpack-numpy(str keys)"):
        result, _ = attempt("codec.array_from_wire (hostile)", codec.array_from_wire, hostile_values()[name])

        assert isinstance(result, FedmqError), name


# -------------------------------------------------------------- crafted headers claiming huge sizes


def _frame_with_header(header: Any, data: bytes = b"") -> bytes:
    raw = msgpack.packb(header) if not isinstance(header, bytes) else header
    prefix = struct.pack("<4sB3sI", b"FMQW", 1, b"\0\0\0", len(raw))
    head = prefix + raw
    return head + bytes(-len(head) % 64) + data


def _envelope_with_meta(meta: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("<4sI", b"FMQE", len(meta)) + meta + payload


def huge_claims() -> dict[str, tuple[str, Callable[[bytes], Any], bytes]]:
    """Small inputs whose headers claim gigabytes: (decoder, call, input)."""
    decode_frame: Callable[[bytes], Any] = codec.decode_weights
    key = signing_key().public_key()

    def env(b: bytes) -> Any:
        return signing.open_envelope(b, key)

    def code(b: bytes) -> Any:
        return ModelCode.from_bytes(b)

    nested_arrays = b"\x81\xa1v" + b"\xdd\x00\x00\x27\x10" * 1000  # 1000 nested arrays of 10,000 claimed
    return {
        "message map32 of 4G pairs": ("messages.decode", decode, b"\xdf\xff\xff\xff\xff"),
        "message str32 of 4 GiB": ("messages.decode", decode, b"\x81\xa1v\xdb\xff\xff\xff\xff"),
        "message bin32 of 4 GiB": ("messages.decode", decode, b"\x81\xa1v\xc6\xff\xff\xff\xff"),
        "message payload of 2^63 bytes": (
            "messages.decode",
            decode,
            msgpack.packb({**delta_fields(), "payload": 2**63}),
        ),
        "message 1000 nested array32 of 10,000": ("messages.decode", decode, nested_arrays),
        "frame header of 4 GiB": ("codec.decode_weights", decode_frame, b"FMQW\x01\0\0\0\xff\xff\xff\xff"),
        "frame of 2^40 x 2^40 float64": (
            "codec.decode_weights",
            decode_frame,
            _frame_with_header(
                {"v": 1, "arrays": [["<f8", [2**40, 2**40], 0, 2**64 - 1]], "data": 2**64 - 1}
            ),
        ),
        "frame claiming 2^62 data bytes": (
            "codec.decode_weights",
            decode_frame,
            _frame_with_header({"v": 1, "arrays": [], "data": 2**62}),
        ),
        "frame with array32 of 4G entries": (
            "codec.decode_weights",
            decode_frame,
            _frame_with_header(b"\x83\xa1v\x01\xa6arrays\xdd\xff\xff\xff\xff"),
        ),
        "frame with a zero-size array of absurd extent": (
            "codec.decode_weights",
            decode_frame,
            _frame_with_header({"v": 1, "arrays": [["<f8", [0, 2**62, 2**62], 0, 0]], "data": 0}),
        ),
        "wire array of shape 2^31 x 4": (
            "codec.array_from_wire",
            codec.array_from_wire,
            msgpack.packb({"dtype": "<f4", "shape": [2**31] * 4, "data": b""}),
        ),
        "envelope meta of 4 GiB": ("signing.open_envelope", env, b"FMQE\xff\xff\xff\xff"),
        "envelope meta with bin32 of 4 GiB": (
            "signing.open_envelope",
            env,
            _envelope_with_meta(b"\x84\xa1v\x01\xa6header\xc6\xff\xff\xff\xff"),
        ),
        "model code map32 of 4G pairs": ("ModelCode.from_bytes", code, b"\xdf\xff\xff\xff\xff"),
        "manifest array32 of 4G items": ("release.parse_manifest", parse_manifest, b"\xdd\xff\xff\xff\xff"),
    }


@pytest.mark.parametrize("name", sorted(huge_claims()))
def test_headers_claiming_huge_sizes_allocate_little(name: str):
    decoder, call, data = huge_claims()[name]
    if decoder == "codec.array_from_wire":
        data_obj: Any = msgpack.unpackb(data)
        result, peak = attempt(decoder + " (huge claims)", call, data_obj)
    else:
        result, peak = attempt(decoder + " (huge claims)", call, data)

    assert isinstance(result, FedmqError), result
    # The message unpacker preallocates every claimed array (msgpack's C unpacker), up to
    # max_array_len (10,000) per level and 1,024 levels: 1000 nested claims cost ~77 MiB, whatever
    # the body's size. Everything else stays under 1 MiB.
    limit = 96 * MIB if "nested array32" in name else 1 * MIB
    assert peak < limit, f"{name}: {peak} bytes"


# -------------------------------------------------------------------------- envelopes and releases


@cache
def good_envelope() -> bytes:
    return signing.seal(b"payload bytes", key=signing_key(), kind="model-code", model_id="m", version=3)


def _check_envelope(data: bytes) -> None:
    key = signing_key().public_key()
    result, peak = attempt("signing.open_envelope", signing.open_envelope, data, key)
    if not isinstance(result, FedmqError):
        header, payload = result
        # Whatever was mutated, an envelope that opens says exactly what was signed.
        assert (header.model_id, header.version, bytes(payload)) == ("m", 3, b"payload bytes")
    else:
        assert isinstance(result, SignatureError), result
    assert_bounded(peak, len(data))


envelopes = st.one_of(
    st.just(b"").map(lambda _: good_envelope()),
    st.just(b"").map(lambda _: good_envelope()).flatmap(mutations_of),
    st.sampled_from(list(evil_pickles().values())),
    st.binary(max_size=256).map(lambda b: b"FMQE" + b),
    st.binary(max_size=256),
)
test_open_envelope_fuzz, test_open_envelope_fuzz_long = fuzz(envelopes)(_check_envelope)


@st.composite
def forged_envelopes(draw: st.DrawFn) -> bytes:
    """Envelopes whose outer map and header are any msgpack: wrong types, ext types, no signature."""
    header = draw(
        st.dictionaries(
            st.sampled_from(
                ["created", "expires", "key_id", "kind", "model_id", "sha256", "size", "version"]
            ),
            JSON_LIKE | st.sampled_from(list(hostile_values().values())),
            max_size=8,
        )
    )
    header_bytes = msgpack.packb(header, use_bin_type=True)
    sig = draw(st.sampled_from([b"", bytes(64), signing_key().sign(header_bytes), b"x"]))
    meta = {"v": draw(st.sampled_from([1, 2, "1"])), "type": "envelope", "header": header_bytes, "sig": sig}
    if draw(st.booleans()):
        meta["extra"] = draw(JSON_LIKE | st.sampled_from(list(hostile_values().values())))
    return _envelope_with_meta(msgpack.packb(meta, use_bin_type=True), draw(st.binary(max_size=32)))


test_forged_envelopes_fuzz, test_forged_envelopes_fuzz_long = fuzz(forged_envelopes())(_check_envelope)


def _check_release(release: ModelRelease) -> None:
    good = good_release()
    result, peak = attempt("release.open_release", open_release, release, signing_key().public_key())
    if isinstance(result, VerifiedRelease):
        # Only a release carrying the signed parts opens, and it opens to what was signed.
        assert result.code == good.code and result.version == 2 and result.model == "m"
        assert [a.tobytes() for a in result.weights] == [w.tobytes() for w in good.weights]
    assert peak < 1 * MIB + 64 * len(release.payload)


@st.composite
def mutated_releases(draw: st.DrawFn) -> ModelRelease:
    good = good_release()
    parts = [good.code_envelope, good.manifest_envelope, good.frame]
    mode = draw(st.sampled_from(["part", "swap", "sizes", "fields", "foreign", "hostile"]))
    code_size, manifest_size = len(parts[0]), len(parts[1])
    model, version = "m", 2
    if mode == "part":
        i = draw(st.integers(0, 2))
        parts[i] = draw(mutations_of(parts[i]))
        code_size, manifest_size = len(parts[0]), len(parts[1])
    elif mode == "swap":
        parts[0], parts[1] = parts[1], parts[0]
        code_size, manifest_size = len(parts[0]), len(parts[1])
    elif mode == "sizes":
        sizes = st.integers(-(2**63), 2**64) | st.integers(-2, 2 * len(good.release.payload))
        code_size, manifest_size = draw(sizes), draw(sizes)
    elif mode == "fields":
        model = draw(st.sampled_from(["m", "other", ""]) | st.text(max_size=8))
        version = draw(st.integers(-1, 5) | st.integers(-(2**63), 2**64))
    elif mode == "foreign":
        key = other_key()
        i = draw(st.integers(0, 1))
        kind = signing.KIND_MODEL_CODE if i == 0 else KIND_MODEL_WEIGHTS
        payload = signing.open_envelope(parts[i], signing_key().public_key())[1]
        parts[i] = signing.seal(bytes(payload), key=key, kind=kind, model_id="m", version=0 if i == 0 else 2)
        code_size, manifest_size = len(parts[0]), len(parts[1])
    else:
        i = draw(st.integers(0, 2))
        parts[i] = draw(st.sampled_from(list(hostile_bodies().values())))
        code_size, manifest_size = len(parts[0]), len(parts[1])
    return ModelRelease(
        model=model,
        version=version,
        code_sha256=good.release.code_sha256,
        weights_sha256=good.release.weights_sha256,
        code_size=code_size,
        manifest_size=manifest_size,
        payload=b"".join(parts),
    )


test_open_release_fuzz, test_open_release_fuzz_long = fuzz(mutated_releases())(_check_release)


def test_the_unmutated_release_opens():
    result, _ = attempt(
        "release.open_release", open_release, good_release().release, signing_key().public_key()
    )

    assert isinstance(result, VerifiedRelease)


def _check_model_code(data: bytes) -> None:
    result, peak = attempt("ModelCode.from_bytes", ModelCode.from_bytes, data)
    assert isinstance(result, ModelCode | FedmqError)
    assert_bounded(peak, len(data))


model_code_bytes = st.just(b"").map(lambda _: good_release().code.to_bytes())
test_model_code_fuzz, test_model_code_fuzz_long = fuzz(
    bodies_of(model_code_bytes)
    | st.sampled_from(list(hostile_bodies().values()))
    | JSON_LIKE.map(
        lambda v: msgpack.packb({"v": 1, "type": "model-code", "functions": v}, use_bin_type=True)
    )
)(_check_model_code)


def _check_manifest(data: bytes) -> None:
    result, peak = attempt("release.parse_manifest", parse_manifest, data)
    assert isinstance(result, dict | FedmqError)
    assert_bounded(peak, len(data))


manifests = st.just(b"").map(lambda _: version_manifest("m", 2, 1, "0" * 64, 100, "1" * 64))
test_parse_manifest_fuzz, test_parse_manifest_fuzz_long = fuzz(
    bodies_of(manifests) | st.sampled_from(list(hostile_bodies().values()))
)(_check_manifest)


# ---------------------------------------------------------------------------------- chunk reassembly

HEX32 = st.text("0123456789abcdef", min_size=32, max_size=32)
HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
HEADER_VALUES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(0, 64),
    st.floats(),
    st.decimals(allow_nan=False),
    st.sampled_from([decimal.Decimal("Infinity"), decimal.Decimal("NaN"), float("inf"), float("nan")]),
    st.text(max_size=70),
    st.binary(max_size=70),
    HEX32,
    HEX64,
    HEX32.map(lambda s: s + "\n"),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def chunk_headers(draw: st.DrawFn) -> dict[str, Any]:
    return {name: draw(HEADER_VALUES) for name in CHUNK_HEADERS if draw(st.integers(0, 7)) > 0}


def _add_chunk(reassembler: Reassembler, headers: dict[str, Any], data: bytes, sender: str) -> Any:
    header = ChunkHeader.from_headers(headers)
    return None if header is None else reassembler.add(header, data, sender)


@settings(BASE_SETTINGS, max_examples=FAST_EXAMPLES)
@given(
    st.lists(st.tuples(chunk_headers(), st.binary(max_size=64), st.sampled_from(["w1", "w2"])), max_size=6)
)
def test_chunk_headers_fuzz(chunks: list[tuple[dict[str, Any], bytes, str]]):
    with tempfile.TemporaryDirectory() as tmp:
        reassembler = Reassembler(Path(tmp), max_transfer_size=1 * MIB, fsync=False)
        for headers, data, sender in chunks:
            result, peak = attempt("chunks.Reassembler", _add_chunk, reassembler, headers, data, sender)

            assert result is None or isinstance(result, FedmqError) or result.size == len(data)
            assert peak < 2 * MIB  # the sha256 check reads the reassembled file in 1 MiB blocks


@st.composite
def chunk_deliveries(draw: st.DrawFn) -> tuple[bytes, int, list[tuple[int, bytes, str]]]:
    """A body's chunks in any order, with duplicates, one maybe corrupted or from another sender."""
    body = draw(st.binary(min_size=1, max_size=300))
    chunk_size = draw(st.integers(1, 64))
    pieces = [bytes(data) for _, data in split_body(body, chunk_size)]
    order = draw(st.lists(st.integers(0, len(pieces) - 1), min_size=len(pieces), max_size=len(pieces) * 2))
    order += [i for i in range(len(pieces)) if i not in order]
    deliveries = [(i, pieces[i], "w1") for i in order]
    tamper = draw(st.sampled_from(["none", "bytes", "sender"]))
    if tamper != "none":
        at = draw(st.integers(0, len(deliveries) - 1))
        i, data, _ = deliveries[at]
        if tamper == "bytes":
            deliveries[at] = (i, draw(mutations_of(data).filter(lambda d: d != data)), "w1")
        else:
            deliveries[at] = (i, data, "w2")
    return body, chunk_size, deliveries


@settings(BASE_SETTINGS, max_examples=FAST_EXAMPLES)
@given(chunk_deliveries())
def test_a_reassembled_body_is_exactly_the_sent_one_or_refused(
    case: tuple[bytes, int, list[tuple[int, bytes, str]]],
):
    body, chunk_size, deliveries = case
    headers = {h.index: h for h, _ in split_body(body, chunk_size)}
    with tempfile.TemporaryDirectory() as tmp:
        reassembler = Reassembler(Path(tmp), max_transfer_size=1 * MIB, fsync=False)
        completed = []
        for index, data, sender in deliveries:
            result, _ = attempt("chunks.Reassembler", reassembler.add, headers[index], data, sender)
            if isinstance(result, FedmqError):
                assert isinstance(result, TransferError)
            elif result is not None:
                completed.append(result.path.read_bytes())
        # Every completion (there may be several before finish()) is exactly the body sent.
        assert all(c == body for c in completed)


def test_chunk_headers_of_infinite_or_huge_sizes_are_transfer_errors():
    base = ChunkHeader("a" * 32, 0, 1, 1, 1, "0" * 64).to_headers()
    for name in CHUNK_HEADERS[1:5]:
        for value in (float("inf"), decimal.Decimal("Infinity"), float("nan"), "9" * 5000, [1]):
            result, _ = attempt("chunks.ChunkHeader", ChunkHeader.from_headers, {**base, name: value})

            assert isinstance(result, TransferError), (name, value)


def test_a_chunk_claiming_a_4_gib_transfer_allocates_little():
    headers = ChunkHeader("b" * 32, 0, 2**32, 2**32, 1, "0" * 64).to_headers()
    with tempfile.TemporaryDirectory() as tmp:
        reassembler = Reassembler(Path(tmp), fsync=False)  # the default limit: 4 GiB per transfer

        result, peak = attempt(
            "chunks.Reassembler (huge claims)", _add_chunk, reassembler, headers, b"x", "w1"
        )

        assert result is None and peak < 1 * MIB
        over = {**headers, "x-fedmq-size": 2**40, "x-fedmq-chunks": 2**40}
        refused, _ = attempt("chunks.Reassembler (huge claims)", _add_chunk, reassembler, over, b"x", "w1")
        assert isinstance(refused, TransferError)


@pytest.mark.parametrize("name", sorted(hostile_bodies()))
def test_a_chunked_hostile_body_reassembles_then_is_refused_by_decode(name: str):
    body = hostile_bodies()[name]
    with tempfile.TemporaryDirectory() as tmp:
        reassembler = Reassembler(Path(tmp), fsync=False)
        done = None
        for header, data in split_body(body, 7):
            done, _ = attempt("chunks.Reassembler (hostile)", reassembler.add, header, data, "w1")
        assert done is not None and not isinstance(done, FedmqError)

        result, _ = attempt("messages.decode (hostile)", coordinator_intake, done.path.read_bytes())

    assert isinstance(result, FedmqError)
    assert not PWNED.exists()


# ------------------------------------------------------------------------------ atheris (optional)


def _atheris_main(argv: list[str]) -> None:  # pragma: no cover - a separate, optional process
    import atheris

    key = signing_key().public_key()

    def one_input(data: bytes) -> None:
        for fn in (
            coordinator_intake,
            lambda b: codec.decode_weights(b, limits=INTAKE_LIMITS),
            lambda b: signing.open_envelope(b, key),
            ModelCode.from_bytes,
            parse_manifest,
        ):
            with no_code_execution():
                try:
                    fn(data)
                except FedmqError:
                    pass

    seeds = [good_envelope(), good_release().release.encode(), good_release().frame]
    corpus_args = [a for a in argv if a.startswith("--corpus=")]
    argv = [a for a in argv if a not in corpus_args]
    corpus = Path(corpus_args[-1].split("=", 1)[1]) if corpus_args else Path(tempfile.mkdtemp())
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(seed)
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *argv, str(corpus)], one_input)
    atheris.Fuzz()


@pytest.mark.slow
def test_atheris_drives_the_coordinator_intake(tmp_path: Path):
    """Coverage-guided fuzzing on top of hypothesis, when atheris is installed (it is optional)."""
    pytest.importorskip("atheris", reason="atheris is optional; hypothesis is the required fuzzer")
    import subprocess

    runs = int(os.environ.get("FEDMQ_ATHERIS_RUNS", "20000"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.unit.test_hostile_input",
            "atheris",
            f"-runs={runs}",
            f"--corpus={tmp_path}",
        ],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done" in proc.stderr and not PWNED.exists()


if __name__ == "__main__" and sys.argv[1:2] == ["atheris"]:  # pragma: no cover
    _atheris_main(sys.argv[2:])
