"""A model split in two: its code (signed once per model) and its weights (one set per version).

:class:`ModelCode` holds what a dafne blob holds besides the weights: model id, type,
dimensionality, metadata and function sources. Its bytes are deterministic msgpack of strings and
numbers — reading them never unpickles or executes anything; only :func:`join_model` compiles the
sources, on the trusted side (the coordinator at registration, a worker after verification).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from common.errors import DecodeError, ModelCodeError, ModelError
from common.model.dynamic import FUNCTION_NAMES, DynamicDLModel

CODE_FORMAT_VERSION = 1
_MAX_CODE_BYTES = 64 * 1024 * 1024


def _canonical(value: Any, where: str) -> Any:
    """``value`` with dict keys sorted (recursively), refusing what msgpack would not carry as data."""
    if isinstance(value, dict):
        return {str(k): _canonical(value[k], f"{where}.{k}") for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [_canonical(v, where) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    raise ModelError(f"{where}: a {type(value).__name__} cannot be stored as model metadata")


@dataclass(frozen=True)
class ModelCode:
    """Everything of a model but its weights."""

    model_id: str | int
    functions: dict[str, str | None]
    type: str = "DynamicDLModel"
    data_dimensionality: int = 2
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """Deterministic bytes: the same code always gives the same bytes (and sha256)."""
        body = {
            "v": CODE_FORMAT_VERSION,
            "type": "model-code",
            "model_id": self.model_id,
            "model_type": self.type,
            "data_dimensionality": int(self.data_dimensionality),
            "metadata": _canonical(self.metadata, "metadata"),
            "functions": {name: self.functions.get(name) for name in FUNCTION_NAMES},
        }
        return msgpack.packb(body, use_bin_type=True)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> ModelCode:
        """Parse bytes written by :meth:`to_bytes`; any malformation raises :class:`DecodeError`."""
        if len(data) > _MAX_CODE_BYTES:
            raise DecodeError(f"model code of {len(data)} bytes exceeds {_MAX_CODE_BYTES}")
        try:
            body = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise DecodeError(f"model code does not parse: {type(exc).__name__}: {exc}") from exc
        if not isinstance(body, dict) or body.get("type") != "model-code":
            raise DecodeError("not a fedmq model-code record")
        if body.get("v") != CODE_FORMAT_VERSION:
            raise DecodeError(f"model code format version {body.get('v')!r} is not supported")
        functions = body.get("functions")
        if not isinstance(functions, dict) or not all(
            isinstance(functions.get(name), str | None) for name in FUNCTION_NAMES
        ):
            raise DecodeError("model code: 'functions' must map each function name to source text")
        model_id = body.get("model_id")
        if not isinstance(model_id, str | int):
            raise DecodeError("model code: 'model_id' must be a string or an integer")
        dims, metadata, model_type = (
            body.get("data_dimensionality"),
            body.get("metadata"),
            body.get("model_type"),
        )
        if not isinstance(dims, int) or not isinstance(metadata, dict) or not isinstance(model_type, str):
            raise DecodeError("model code: bad data_dimensionality, metadata or model_type")
        return cls(
            model_id=model_id,
            functions={name: functions.get(name) for name in FUNCTION_NAMES},
            type=model_type,
            data_dimensionality=dims,
            metadata=metadata,
        )


def code_of(model: DynamicDLModel) -> ModelCode:
    """The :class:`ModelCode` of a model (its function sources must be retrievable)."""
    sources = model.function_sources()
    for name in ("init_model_function", "apply_model_function"):
        if sources.get(name) is None:
            raise ModelCodeError(name, "is required")
    metadata = {k: v for k, v in model.metadata.items()}
    _canonical(metadata, "metadata")
    return ModelCode(
        model_id=model.model_id,
        functions=sources,
        type=model.type,
        data_dimensionality=model.get_data_dimensionality(),
        metadata=metadata,
    )


def split_model(model: DynamicDLModel) -> tuple[ModelCode, list[np.ndarray]]:
    """Split a model into its code and its weights (a list of numpy arrays)."""
    weights = [np.asarray(w) for w in model.get_weights()]
    return code_of(model), weights


def join_model(
    code: ModelCode,
    weights: list[np.ndarray] | None,
    timestamp_id: Any = None,
    is_delta: bool = False,
) -> DynamicDLModel:
    """Build a model from code and weights. This compiles the code: trusted code only."""
    if code.type != "DynamicDLModel":
        from common.errors import UnsupportedModelTypeError

        raise UnsupportedModelTypeError(code.type)
    functions = {name: src for name, src in code.functions.items() if src is not None}
    return DynamicDLModel(
        code.model_id,
        weights=weights,
        timestamp_id=timestamp_id,
        is_delta=is_delta,
        data_dimensionality=code.data_dimensionality,
        metadata=dict(code.metadata),
        **functions,
    )
