"""The SQL schema as SQLAlchemy 2 typed models: the coordinator's source of truth.

Tables (see docs/registry.md for the picture):

- ``models``: one row per registered model: unique ``name``, the dafne ``model_id``, the model's code
  (function sources and metadata as :class:`common.model.bundle.ModelCode` bytes) with its sha256 and
  the signed ``model-code`` envelope. The code is written once.
- ``model_versions``: integer ``version`` per model, ``parent`` (lineage), a reference to the weights
  (a blob holding the array-codec frame) with sha256 and signature, the round and strategy that made
  it, metrics, dafne's ``timestamp_id`` and a ``status``. Immutable once written except ``status``
  (``active`` / ``rolled_back``); the ORM guard below and database triggers both refuse other changes.
- ``blobs`` / ``blob_chunks``: large byte strings (weights, deltas, job inputs, big outbox bodies)
  stored as fixed-size chunks, so writing and reading a 100 MB frame never needs a second full copy
  in the driver. Written once.
- ``runs``, ``workers``, ``rounds``, ``tasks``, ``deltas``, ``jobs`` and ``outbox``: the state the
  messaging layer keeps (a submitted run and its options; round state, quorum, deadline; one task id
  per expected delta; delta status and rejection reason; worker credentials fingerprint and last
  seen; the transactional outbox).

The metadata carries a naming convention so Alembic migrations get stable constraint names. Every
change here needs a migration in ``migrations/versions`` (a test compares them).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
    inspect,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from common.errors import ImmutableRecordError

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# 64-bit ids where row counts can grow without bound; SQLite only auto-increments INTEGER.
BigId = BigInteger().with_variant(Integer(), "sqlite")

VERSION_ACTIVE = "active"
VERSION_ROLLED_BACK = "rolled_back"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive text; we re-attach UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: fedmq stores timezone-aware UTC timestamps")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON(), list[str]: JSON()}


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model_id: Mapped[str] = mapped_column(String(256))
    model_type: Mapped[str] = mapped_column(String(64))
    code: Mapped[bytes] = mapped_column(LargeBinary)
    code_sha256: Mapped[str] = mapped_column(String(64))
    code_envelope: Mapped[bytes] = mapped_column(LargeBinary)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.version", passive_deletes=True
    )


class Blob(Base):
    __tablename__ = "blobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    chunk_size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Set for a blob kept in a file of the database's blob directory (coordinator/db/blobs.py):
    # its bytes are [file_offset, file_offset + size) of that file, and it has no chunks.
    file: Mapped[str | None] = mapped_column(String(64), default=None)
    file_offset: Mapped[int | None] = mapped_column(BigInteger, default=None)


class BlobChunk(Base):
    __tablename__ = "blob_chunks"

    blob_id: Mapped[int] = mapped_column(ForeignKey("blobs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_pk", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_pk: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    weights_blob_id: Mapped[int] = mapped_column(ForeignKey("blobs.id"), index=True)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    weights_size: Mapped[int] = mapped_column(BigInteger)
    # What the weights look like without reading them: array count, parameter count, and the sha256
    # of the (dtype, shape) list, so a new version can be checked against its parent cheaply.
    array_count: Mapped[int] = mapped_column(Integer)
    parameter_count: Mapped[int] = mapped_column(BigInteger)
    layout_sha256: Mapped[str] = mapped_column(String(64))
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    # The round that made this version. Not a foreign key: rounds reference their base version,
    # and a cycle of foreign keys would make both tables impossible to create or drop cleanly.
    round_id: Mapped[int | None] = mapped_column(Integer, index=True)
    strategy: Mapped[str | None] = mapped_column(String(64))
    strategy_config: Mapped[dict[str, Any] | None]
    metrics: Mapped[dict[str, Any] | None]
    timestamp_id: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default=VERSION_ACTIVE)
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions")
    parent: Mapped[ModelVersion | None] = relationship(remote_side=[id])


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    credentials_fingerprint: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="active")
    info: Mapped[dict[str, Any] | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[dt.datetime | None]


class Run(Base):
    """A submitted training run: R synchronous rounds (or an asynchronous run) of one model."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64), unique=True)
    model_pk: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16), default="running", index=True)
    mode: Mapped[str] = mapped_column(String(16), default="sync")
    rounds_total: Mapped[int] = mapped_column(Integer, default=1)
    rounds_done: Mapped[int] = mapped_column(Integer, default=0)
    min_workers: Mapped[int] = mapped_column(Integer, default=1)
    fraction: Mapped[float] = mapped_column(Float, default=1.0)
    workers: Mapped[list[str] | None]
    deadline_s: Mapped[float] = mapped_column(Float)
    strategy: Mapped[str] = mapped_column(String(64), default="fedavg")
    strategy_options: Mapped[dict[str, Any] | None]
    train_options: Mapped[dict[str, Any] | None]
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]
    # A held-out .npz (x, y) on the coordinator's machine: each new version's accuracy on it is recorded.
    eval_data: Mapped[str | None] = mapped_column(Text)
    # Server optimizer state (FedAdam's moments, ...) as a weight frame, carried from round to round.
    server_state_blob_id: Mapped[int | None] = mapped_column(ForeignKey("blobs.id"))
    # Asynchronous runs: deltas more versions behind the current one than this are rejected.
    max_staleness: Mapped[int | None] = mapped_column(Integer)
    # Delta bounds of this run: a delta whose L2 norm exceeds max_norm, or that claims more samples
    # than max_samples, is rejected with that reason (None: the coordinator's defaults).
    max_norm: Mapped[float | None] = mapped_column(Float)
    max_samples: Mapped[int | None] = mapped_column(BigInteger)


class Round(Base):
    __tablename__ = "rounds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_pk: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    number: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), default="open", index=True)
    base_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    result_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    strategy: Mapped[str] = mapped_column(String(64), default="fedavg")
    strategy_config: Mapped[dict[str, Any] | None]
    quorum: Mapped[int] = mapped_column(Integer, default=1)
    deadline: Mapped[dt.datetime | None]
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[dt.datetime | None]


class Task(Base):
    __tablename__ = "tasks"
    # A round's rule asks whether any of its tasks is still pending, once per batch of deltas.
    __table_args__ = (Index("ix_tasks_round_state", "round_id", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[str] = mapped_column(String(64), unique=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    worker_id: Mapped[int | None] = mapped_column(ForeignKey("workers.id", ondelete="SET NULL"))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]
    done_at: Mapped[dt.datetime | None]


class Delta(Base):
    __tablename__ = "deltas"
    # Counting a round's accepted deltas (its quorum, an async buffer) reads only this index.
    __table_args__ = (Index("ix_deltas_round_status", "round_id", "status"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # One row per task: a duplicate delivery of the same task's delta hits this constraint.
    task_id: Mapped[str | None] = mapped_column(ForeignKey("tasks.task_id", ondelete="CASCADE"), unique=True)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    worker_id: Mapped[int | None] = mapped_column(ForeignKey("workers.id", ondelete="SET NULL"))
    worker_name: Mapped[str | None] = mapped_column(String(200))
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    weights_blob_id: Mapped[int | None] = mapped_column(ForeignKey("blobs.id"))
    sample_count: Mapped[int] = mapped_column(BigInteger, default=0)
    norm: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="accepted")
    rejection_reason: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None]
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(32), default="apply")
    model_pk: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    worker_id: Mapped[int | None] = mapped_column(ForeignKey("workers.id", ondelete="SET NULL"))
    input_blob_id: Mapped[int | None] = mapped_column(ForeignKey("blobs.id"))
    result_blob_id: Mapped[int | None] = mapped_column(ForeignKey("blobs.id"))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]


class OutboxMessage(Base):
    """A message written in the same transaction as the state it announces; a relay publishes it."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "sent_at", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_id: Mapped[str] = mapped_column(String(64), unique=True)
    exchange: Mapped[str] = mapped_column(String(255))
    routing_key: Mapped[str] = mapped_column(String(255))
    headers: Mapped[dict[str, Any] | None]
    body: Mapped[bytes | None] = mapped_column(LargeBinary)
    body_blob_id: Mapped[int | None] = mapped_column(ForeignKey("blobs.id"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]


_MUTABLE_VERSION_COLUMNS = frozenset({"status"})


@event.listens_for(ModelVersion, "before_update")
def _refuse_version_changes(_mapper: Mapper[Any], _connection: Any, target: ModelVersion) -> None:
    state = inspect(target)
    changed = {a.key for a in state.attrs if a.history.has_changes()} - _MUTABLE_VERSION_COLUMNS
    changed -= {"model", "parent"}  # relationships; their columns are checked themselves
    if changed:
        raise ImmutableRecordError(
            f"model versions are immutable: refusing to change {', '.join(sorted(changed))} "
            f"of version {target.version}"
        )


@event.listens_for(Blob, "before_update")
@event.listens_for(BlobChunk, "before_update")
def _refuse_blob_changes(_mapper: Mapper[Any], _connection: Any, target: Blob | BlobChunk) -> None:
    raise ImmutableRecordError("stored weights are immutable")
