"""Application messages: small frozen dataclasses with ``encode``/``decode``.

Wire form of every body: a msgpack map ``{"v": 1, "type": NAME, <fields>, "payload": N}`` directly
followed by ``N`` raw bytes (a weight frame, or signed envelopes). The raw tail stays outside msgpack
so a 100 MB delta is not copied on decode: :attr:`payload` is a view over the received body.

Decoding is for bytes from anyone (workers, admins): the map is parsed with tight msgpack limits and
no ext types, every field is checked against its declared type, unknown or missing fields and
unknown types are refused, and every failure is a :class:`~common.errors.DecodeError`. Nothing is
ever unpickled or executed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, TypeVar, Union

import msgpack

from common.errors import DecodeError

if typing.TYPE_CHECKING:
    from common.codec import WeightFrame

SCHEMA_VERSION = 1
MAX_MAP_BYTES = 256 * 1024
MAX_NESTING = 32
_REGISTRY: dict[str, type[Message]] = {}
M = TypeVar("M", bound="Message")


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise DecodeError(f"msgpack ext type {code} is not allowed in fedmq messages")


@dataclass(frozen=True)
class Message:
    """Base of every message; subclasses set ``TYPE`` and declare their fields."""

    TYPE: ClassVar[str] = ""
    HAS_PAYLOAD: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            if cls.TYPE in _REGISTRY:
                raise TypeError(f"message type {cls.TYPE!r} is defined twice")
            _REGISTRY[cls.TYPE] = cls

    def _head(self, payload_size: int) -> bytes:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "payload"}
        return msgpack.packb(
            {"v": SCHEMA_VERSION, "type": self.TYPE, **fields, "payload": payload_size}, use_bin_type=True
        )

    def encode(self) -> bytes:
        """The body to publish."""
        payload = bytes(getattr(self, "payload", b"")) if self.HAS_PAYLOAD else b""
        head = self._head(len(payload))
        return head + payload if payload else head

    def encode_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> bytearray:
        """The body of this message with ``parts``, concatenated, as its payload: written straight
        after the map (one copy of them, where joining them and then the message makes two).
        ``payload`` itself must be empty."""
        if not self.HAS_PAYLOAD or len(getattr(self, "payload", b"")):
            raise TypeError(f"{type(self).__name__}: the parts must be the message's only payload")
        views = [memoryview(part).cast("B") for part in parts]
        head = self._head(sum(len(view) for view in views))
        body = bytearray(len(head) + sum(len(view) for view in views))
        position = 0
        for view in (memoryview(head), *views):
            body[position : position + len(view)] = view
            position += len(view)
        return body

    def encode_with_frame(self, frame: WeightFrame) -> bytearray:
        """The body of this message with ``frame`` (a laid-out weight frame) as its payload.

        The frame is written straight after the map: one copy of the weights, where encoding the
        frame and then the message makes two. ``payload`` itself must be empty.
        """
        if not self.HAS_PAYLOAD or len(getattr(self, "payload", b"")):
            raise TypeError(f"{type(self).__name__}: the frame must be the message's only payload")
        head = self._head(frame.nbytes)
        body = bytearray(len(head) + frame.nbytes)
        body[: len(head)] = head
        frame.write_into(memoryview(body)[len(head) :])
        return body


_Schema = tuple[dict[str, Any], frozenset[str], frozenset[str]]
_SCHEMAS: dict[str, _Schema] = {}


def _schema(cls: type[Message]) -> _Schema:
    """(type hints, declared fields, fields without a default) of a message class, computed once."""
    if cls.TYPE in _SCHEMAS:
        return _SCHEMAS[cls.TYPE]
    fields = [f for f in dataclasses.fields(cls) if f.name != "payload"]
    required = {
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    schema = typing.get_type_hints(cls), frozenset(f.name for f in fields), frozenset(required)
    _SCHEMAS[cls.TYPE] = schema
    return schema


def decode(body: bytes | bytearray | memoryview, expected: type[M] | None = None) -> M:
    """Decode any message body (or one of type ``expected``); see the module docstring."""
    view = memoryview(body).cast("B")
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        ext_hook=_reject_ext,
        max_buffer_size=MAX_MAP_BYTES,
        max_str_len=MAX_MAP_BYTES,
        max_bin_len=MAX_MAP_BYTES,
        max_array_len=1_000,  # msgpack preallocates declared lengths: keep nested claims small
        max_map_len=1_000,
        max_ext_len=0,
    )
    unpacker.feed(view[:MAX_MAP_BYTES])
    try:
        head = unpacker.unpack()
    except msgpack.OutOfData:
        raise DecodeError("message: truncated, or its map exceeds the size limit") from None
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise DecodeError(f"message: not msgpack ({type(exc).__name__}: {exc})") from exc
    if type(head) is not dict:
        raise DecodeError(f"message: expected a map, got {type(head).__name__}")
    if any(type(key) is not str for key in head):
        raise DecodeError("message: every key of the map must be a string")
    if head.get("v") != SCHEMA_VERSION:
        raise DecodeError(f"message: schema version {head.get('v')!r} is not supported")
    name = head.get("type")
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise DecodeError(f"message: unknown type {name!r}")
    if expected is not None and cls is not expected:
        raise DecodeError(f"message: expected {expected.TYPE!r}, got {name!r}")
    size = head.get("payload")
    tail = view[unpacker.tell() :]
    if type(size) is not int or size != len(tail) or (size and not cls.HAS_PAYLOAD):
        raise DecodeError(f"{name}: payload of {len(tail)} bytes does not match the declared {size!r}")
    values = {k: v for k, v in head.items() if k not in ("v", "type", "payload")}
    hints, declared, required = _schema(cls)
    unknown, missing = set(values) - declared, required - set(values)
    if unknown or missing:
        raise DecodeError(f"{name}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
    for key, value in values.items():
        _check(value, hints[key], f"{name}.{key}")
    if cls.HAS_PAYLOAD:
        values["payload"] = tail
    return cls(**values)  # type: ignore[return-value]


_EXACT_TYPES = frozenset({str, int, bool, bytes})  # a value of exactly this type fits


def _check(value: Any, hint: Any, where: str) -> None:
    """Raise DecodeError unless ``value`` fits the type ``hint`` (the subset messages use)."""
    if type(value) is hint and hint in _EXACT_TYPES:
        return  # most fields, asked first: a few microseconds per message at thousands per second
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                _check(value, option, where)
                return
            except DecodeError as exc:
                errors.append(str(exc))
        raise DecodeError(f"{where}: {type(value).__name__} fits none of {hint}")
    if hint is type(None):
        if value is not None:
            raise DecodeError(f"{where}: expected nothing, got {type(value).__name__}")
        return
    if hint is Any:
        _check_plain(value, where)
        return
    if origin is list:
        (item,) = typing.get_args(hint)
        if type(value) is not list:
            raise DecodeError(f"{where}: expected a list, got {type(value).__name__}")
        for i, v in enumerate(value):
            _check(v, item, f"{where}[{i}]")
        return
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if type(value) is not dict:
            raise DecodeError(f"{where}: expected a map, got {type(value).__name__}")
        for k, v in value.items():
            _check(k, key_type, f"{where} key")
            _check(v, value_type, f"{where}[{k!r}]")
        return
    if hint is float:
        if type(value) not in (float, int) or (type(value) is float and not math.isfinite(value)):
            raise DecodeError(f"{where}: expected a finite number, got {value!r}")
        return
    if hint in (str, int, bool, bytes):
        if type(value) is not hint:
            raise DecodeError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return
    raise DecodeError(f"{where}: unsupported field type {hint}")  # a programming error, kept safe


def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    """Any JSON-like value (options and metrics maps), nested at most :data:`MAX_NESTING` deep."""
    if depth > MAX_NESTING:
        raise DecodeError(f"{where}: nested deeper than {MAX_NESTING} levels")
    if value is None or type(value) in (str, int, bool, bytes):
        return
    if type(value) is float:
        if not math.isfinite(value):
            raise DecodeError(f"{where}: non-finite number")
        return
    if type(value) is list:
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]", depth + 1)
        return
    if type(value) is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise DecodeError(f"{where}: map keys must be strings")
            _check_plain(v, f"{where}[{k!r}]", depth + 1)
        return
    raise DecodeError(f"{where}: {type(value).__name__} is not allowed")


# --- admin -> coordinator (control queue) ---------------------------------------------------------


@dataclass(frozen=True)
class StartRun(Message):
    """Start ``rounds`` rounds of training ``model`` from its newest active version."""

    TYPE: ClassVar[str] = "start-run"
    run_id: str
    model: str
    rounds: int
    min_workers: int
    deadline_s: float
    fraction: float = 1.0
    workers: list[str] = field(default_factory=list)
    strategy: str = "fedavg"
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    mode: str = "sync"
    eval_data: str | None = None
    max_staleness: int = 10
    max_norm: float | None = None
    max_samples: int | None = None


@dataclass(frozen=True)
class CancelRun(Message):
    TYPE: ClassVar[str] = "cancel-run"
    run_id: str
    reason: str = "cancelled by an admin"


@dataclass(frozen=True)
class SubmitJob(Message):
    """Apply ``model`` (a version, or the newest) to the arrays in the payload (a weight frame)."""

    TYPE: ClassVar[str] = "submit-job"
    HAS_PAYLOAD: ClassVar[bool] = True
    job_id: str
    model: str
    version: int | None = None
    worker: str | None = None
    payload: bytes | memoryview = field(default=b"", repr=False)


# --- coordinator -> worker ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRelease(Message):
    """A version of a model: payload = code envelope, manifest envelope, weights frame.

    See :mod:`common.release` for what each part is and how a worker verifies them.
    """

    TYPE: ClassVar[str] = "model-release"
    HAS_PAYLOAD: ClassVar[bool] = True
    model: str
    version: int
    code_sha256: str
    weights_sha256: str
    code_size: int
    manifest_size: int
    payload: bytes | memoryview = field(default=b"", repr=False)


@dataclass(frozen=True)
class TrainTask(Message):
    """Train ``model`` version ``version`` on local data and report a delta for ``task_id``."""

    TYPE: ClassVar[str] = "train-task"
    task_id: str
    round_id: int
    model: str
    version: int
    weights_sha256: str
    train: dict[str, Any] = field(default_factory=dict)
    deadline: float | None = None


@dataclass(frozen=True)
class ApplyTask(Message):
    """Apply ``model`` version ``version`` to the arrays in the payload (a weight frame)."""

    TYPE: ClassVar[str] = "apply-task"
    HAS_PAYLOAD: ClassVar[bool] = True
    job_id: str
    model: str
    version: int
    weights_sha256: str
    payload: bytes | memoryview = field(default=b"", repr=False)


@dataclass(frozen=True)
class FetchModel(Message):
    """Worker -> coordinator request (reply_to set): send me ``model`` version ``version``."""

    TYPE: ClassVar[str] = "fetch-model"
    model: str
    version: int


# --- worker -> coordinator (results queue) --------------------------------------------------------


@dataclass(frozen=True)
class DeltaReport(Message):
    """``trained - base`` for one task, as a weight frame in the payload."""

    TYPE: ClassVar[str] = "delta-report"
    HAS_PAYLOAD: ClassVar[bool] = True
    task_id: str
    round_id: int
    worker: str
    model: str
    base_version: int
    base_weights_sha256: str
    sample_count: int
    metrics: dict[str, float] = field(default_factory=dict)
    payload: bytes | memoryview = field(default=b"", repr=False)


@dataclass(frozen=True)
class TaskFailed(Message):
    """The worker could not do a task (bad release, no data, crash in model code)."""

    TYPE: ClassVar[str] = "task-failed"
    task_id: str
    worker: str
    reason: str
    retryable: bool = False


@dataclass(frozen=True)
class JobResult(Message):
    """The outputs of an apply job (a weight frame of arrays) or its error."""

    TYPE: ClassVar[str] = "job-result"
    HAS_PAYLOAD: ClassVar[bool] = True
    job_id: str
    worker: str
    error: str | None = None
    payload: bytes | memoryview = field(default=b"", repr=False)


@dataclass(frozen=True)
class Heartbeat(Message):
    """A worker's announcement and liveness signal."""

    TYPE: ClassVar[str] = "heartbeat"
    worker: str
    sent_at: float
    info: dict[str, Any] = field(default_factory=dict)
