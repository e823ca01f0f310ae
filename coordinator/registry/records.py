"""What the registry returns: small frozen records, detached from any database session."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from coordinator.db.models import Model, ModelVersion


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: its name, dafne model id, code digest and its latest version."""

    name: str
    model_id: str
    model_type: str
    code_sha256: str
    description: str | None
    created_at: dt.datetime
    latest_version: int
    version_count: int

    @classmethod
    def from_row(cls, row: Model, latest_version: int, version_count: int) -> ModelInfo:
        return cls(
            name=row.name,
            model_id=row.model_id,
            model_type=row.model_type,
            code_sha256=row.code_sha256,
            description=row.description,
            created_at=row.created_at,
            latest_version=latest_version,
            version_count=version_count,
        )

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "created_at": self.created_at.isoformat()}


@dataclass(frozen=True)
class VersionInfo:
    """One immutable version of a model, with its lineage and provenance."""

    model: str
    version: int
    parent_version: int | None
    status: str
    weights_sha256: str
    weights_size: int
    array_count: int
    parameter_count: int
    timestamp_id: int
    round_id: int | None
    strategy: str | None
    strategy_config: dict[str, Any] | None
    metrics: dict[str, Any] | None
    note: str | None
    created_at: dt.datetime
    signature: bytes = field(repr=False)

    @classmethod
    def from_row(cls, row: ModelVersion, model_name: str, parent_version: int | None) -> VersionInfo:
        return cls(
            model=model_name,
            version=row.version,
            parent_version=parent_version,
            status=row.status,
            weights_sha256=row.weights_sha256,
            weights_size=row.weights_size,
            array_count=row.array_count,
            parameter_count=row.parameter_count,
            timestamp_id=row.timestamp_id,
            round_id=row.round_id,
            strategy=row.strategy,
            strategy_config=row.strategy_config,
            metrics=row.metrics,
            note=row.note,
            created_at=row.created_at,
            signature=row.signature,
        )

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "signature"}
        data["created_at"] = self.created_at.isoformat()
        return data


@dataclass(frozen=True)
class StoredCode:
    """A model's code as stored: the ModelCode bytes, their sha256 and the signed envelope."""

    model: str
    code: bytes
    sha256: str
    envelope: bytes


@dataclass(frozen=True)
class LayerDiff:
    """How one weight array differs between two versions.

    ``l2`` is the L2 norm of ``b - a`` (None when the shapes differ); ``relative`` divides it by the
    L2 norm of ``a`` (None when that is zero).
    """

    index: int
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype: str
    l2: float | None
    relative: float | None

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "shape_a": list(self.shape_a), "shape_b": list(self.shape_b)}
