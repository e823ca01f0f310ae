"""The model registry: models with their signed code, and immutable versions with lineage.

Contract:

- :meth:`ModelRegistry.register` stores a model's code (signed once) and version 1.
- :meth:`ModelRegistry.add_version` stores version N+1 with its parent, the round and strategy that
  made it and its metrics; its weights must have the parent's layout (array count, shapes, dtypes).
- :meth:`ModelRegistry.rollback` makes a *new* version whose weights are an old version's (the stored
  weights are shared, not copied), marks the versions in between ``rolled_back``, keeps the lineage.
- Versions are never changed once written (only ``status``); the database refuses it too.
- Reads (:meth:`weights`, :meth:`weights_frame`) return read-only arrays / views over one buffer.
- :meth:`delete` removes a model, its versions, rounds, jobs and stored weights, and only with
  ``force=True``.

Everything runs in one transaction per call: a failure leaves nothing half-written. The registry
never unpickles or executes model code: code is :class:`~common.model.bundle.ModelCode` (msgpack of
source text) and weights go through the array codec.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common.codec import decode_weights, layout_frame
from common.errors import (
    AlreadyExistsError,
    DecodeError,
    IncompatibleModelError,
    NotFoundError,
    RequestError,
    StorageError,
)
from common.model.bundle import ModelCode
from common.release import version_manifest
from coordinator.db.blobs import BlobCache, delete_blobs, read_blob, write_blob
from coordinator.db.engine import Database
from coordinator.db.models import (
    VERSION_ACTIVE,
    VERSION_ROLLED_BACK,
    Delta,
    Job,
    Model,
    ModelVersion,
    OutboxMessage,
    Round,
)
from coordinator.registry.diff import layer_diffs
from coordinator.registry.records import LayerDiff, ModelInfo, StoredCode, VersionInfo
from coordinator.registry.signer import Signer, sign_code, sign_version

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 200


def layout_of(weights: Sequence[np.ndarray]) -> tuple[int, int, str]:
    """(array count, parameter count, sha256 of the dtype/shape list) of a weight list."""
    spec = [[np.asarray(w).dtype.newbyteorder("<").str, list(np.shape(w))] for w in weights]
    digest = hashlib.sha256(msgpack.packb(spec)).hexdigest()
    return len(spec), sum(math.prod(shape) for _, shape in spec), digest


def check_name(name: str) -> str:
    """Model names: 1-200 printable characters without spaces or slashes (they appear in CLIs and paths)."""
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable() or any(c in name for c in " /\\"):
        raise RequestError(f"invalid model name {name!r}: use 1-{MAX_NAME_LENGTH} characters, no spaces or /")
    return name


class ModelRegistry:
    """Models and versions in SQL; one instance per process, safe to share between threads."""

    def __init__(self, db: Database, signer: Signer) -> None:
        self.db = db
        self.signer = signer
        # Weight frames of the versions stored or read last (see BlobCache): the round engine's
        # next base and the release the coordinator publishes come from here.
        self.frames = BlobCache()

    # ------------------------------------------------------------------------------------ writing

    def register(
        self,
        name: str,
        code: ModelCode,
        weights: Sequence[np.ndarray],
        *,
        description: str | None = None,
        metrics: dict[str, Any] | None = None,
        timestamp_id: int | None = None,
        note: str | None = None,
    ) -> VersionInfo:
        """Store a new model named ``name`` and its version 1; AlreadyExistsError if the name is taken."""
        check_name(name)
        code_bytes = code.to_bytes()
        code_sha = hashlib.sha256(code_bytes).hexdigest()
        envelope = sign_code(self.signer, name, code_bytes)
        with self.db.session(write=True) as session:
            if session.scalar(select(Model.id).where(Model.name == name)) is not None:
                raise AlreadyExistsError(f"model {name!r} already exists (delete it with --force first)")
            model = Model(
                name=name,
                model_id=str(code.model_id),
                model_type=code.type,
                code=code_bytes,
                code_sha256=code_sha,
                code_envelope=envelope,
                description=description,
            )
            session.add(model)
            try:
                session.flush()
            except IntegrityError as err:  # registered concurrently by another process
                raise AlreadyExistsError(f"model {name!r} already exists") from err
            row = self._store_version(
                session, model, weights, parent=None, metrics=metrics, timestamp_id=timestamp_id, note=note
            )
            info = VersionInfo.from_row(row, name, None)
        logger.info("registered model %s (model id %s), version 1", name, code.model_id)
        return info

    def add_version(
        self,
        name: str,
        weights: Sequence[np.ndarray],
        *,
        parent_version: int | None = None,
        round_id: int | None = None,
        strategy: str | None = None,
        strategy_config: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        timestamp_id: int | None = None,
        note: str | None = None,
    ) -> VersionInfo:
        """Store the next version of ``name`` from ``weights``; the parent defaults to the latest.

        Raises NotFoundError for an unknown model or parent, IncompatibleModelError when the
        weights' layout (array count, shapes, dtypes) differs from the parent's.
        """
        with self.db.session(write=True) as session:
            model = self._model(session, name, lock=True)
            parent = self._version_row(session, model, parent_version)
            row = self.store_version_in(
                session,
                model,
                weights,
                parent=parent,
                round_id=round_id,
                strategy=strategy,
                strategy_config=strategy_config,
                metrics=metrics,
                timestamp_id=timestamp_id,
                note=note,
            )
            info = VersionInfo.from_row(row, name, parent.version)
        logger.info("stored %s v%d (parent v%d)", name, info.version, parent.version)
        return info

    def rollback(self, name: str, version: int, *, note: str | None = None) -> VersionInfo:
        """Make a new latest version with the weights of ``version``; later versions become rolled back."""
        with self.db.session(write=True) as session:
            model = self._model(session, name, lock=True)
            target = self._version_row(session, model, version)
            latest = self._latest_number(session, model)
            if target.version == latest:
                raise RequestError(f"{name} v{version} is already the latest version: nothing to roll back")
            number = latest + 1
            manifest = version_manifest(
                name, number, target.version, target.weights_sha256, target.weights_size, model.code_sha256
            )
            session.execute(
                update(ModelVersion)
                .where(
                    ModelVersion.model_pk == model.id,
                    ModelVersion.version > target.version,
                    ModelVersion.status == VERSION_ACTIVE,
                )
                .values(status=VERSION_ROLLED_BACK)
                .execution_options(synchronize_session=False)
            )
            row = ModelVersion(
                model_pk=model.id,
                version=number,
                parent_id=target.id,
                weights_blob_id=target.weights_blob_id,
                weights_sha256=target.weights_sha256,
                weights_size=target.weights_size,
                array_count=target.array_count,
                parameter_count=target.parameter_count,
                layout_sha256=target.layout_sha256,
                signature=sign_version(self.signer, manifest, name, number),
                strategy="rollback",
                strategy_config={"from_version": target.version, "replaced_version": latest},
                metrics=target.metrics,
                timestamp_id=self._next_timestamp(session, model, None),
                status=VERSION_ACTIVE,
                note=note or f"rollback to v{target.version}",
            )
            session.add(row)
            session.flush()
            info = VersionInfo.from_row(row, name, target.version)
        logger.info("rolled %s back to v%d as v%d", name, version, info.version)
        return info

    def delete(self, name: str, *, force: bool = False) -> int:
        """Delete a model with all its versions, rounds, jobs and weights; returns the version count."""
        if not force:
            raise RequestError(f"deleting model {name!r} removes every version: pass --force to confirm")
        with self.db.session(write=True) as session:
            model = self._model(session, name, lock=True)
            version_blobs = set(
                session.scalars(select(ModelVersion.weights_blob_id).where(ModelVersion.model_pk == model.id))
            )
            round_ids = select(Round.id).where(Round.model_pk == model.id).scalar_subquery()
            delta_blobs = set(
                session.scalars(select(Delta.weights_blob_id).where(Delta.round_id.in_(round_ids)))
            )
            job_rows = session.execute(
                select(Job.input_blob_id, Job.result_blob_id).where(Job.model_pk == model.id)
            ).all()
            blobs = {b for b in version_blobs | delta_blobs if b is not None}
            blobs |= {b for row in job_rows for b in row if b is not None}
            count = self._latest_number(session, model)
            session.delete(model)
            session.flush()
            in_outbox = set(
                session.scalars(
                    select(OutboxMessage.body_blob_id).where(OutboxMessage.body_blob_id.in_(blobs))
                )
            )
            delete_blobs(session, blobs - in_outbox)
        logger.info("deleted model %s (%d versions)", name, count)
        return count

    # ------------------------------------------------------------------------------------ reading

    def list_models(self) -> list[ModelInfo]:
        with self.db.session() as session:
            stats = (
                select(
                    ModelVersion.model_pk,
                    func.max(ModelVersion.version).label("latest"),
                    func.count().label("n"),
                )
                .group_by(ModelVersion.model_pk)
                .subquery()
            )
            rows = session.execute(
                select(Model, stats.c.latest, stats.c.n)
                .join(stats, stats.c.model_pk == Model.id)
                .order_by(Model.name)
            ).all()
            return [ModelInfo.from_row(model, latest, n) for model, latest, n in rows]

    def get_model(self, name: str) -> ModelInfo:
        with self.db.session() as session:
            model = self._model(session, name)
            count = session.scalar(select(func.count()).where(ModelVersion.model_pk == model.id)) or 0
            return ModelInfo.from_row(model, self._latest_number(session, model), count)

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``name``, oldest first, with parent version numbers."""
        with self.db.session() as session:
            model = self._model(session, name)
            rows = session.scalars(
                select(ModelVersion).where(ModelVersion.model_pk == model.id).order_by(ModelVersion.version)
            ).all()
            numbers = {row.id: row.version for row in rows}
            return [
                VersionInfo.from_row(row, name, numbers.get(row.parent_id) if row.parent_id else None)
                for row in rows
            ]

    def version(self, name: str, version: int | None = None) -> VersionInfo:
        """One version (the latest when ``version`` is None); NotFoundError if it does not exist."""
        with self.db.session() as session:
            model = self._model(session, name)
            row = self._version_row(session, model, version)
            parent = session.get(ModelVersion, row.parent_id) if row.parent_id else None
            return VersionInfo.from_row(row, name, parent.version if parent else None)

    def code(self, name: str) -> StoredCode:
        with self.db.session() as session:
            model = self._model(session, name)
            return StoredCode(name, model.code, model.code_sha256, model.code_envelope)

    def model_code(self, name: str) -> ModelCode:
        """The parsed code (safe: msgpack of source text; nothing is compiled here)."""
        stored = self.code(name)
        try:
            return ModelCode.from_bytes(stored.code)
        except DecodeError as err:
            raise StorageError(f"stored code of model {name!r} is damaged: {err}") from err

    def weights_frame(self, name: str, version: int | None = None) -> memoryview:
        """The version's weight frame (array codec), checked against its sha256, as a read-only view."""
        with self.db.session() as session:
            model = self._model(session, name)
            row = self._version_row(session, model, version)
            frame = read_blob(session, row.weights_blob_id)
        if hashlib.sha256(frame).hexdigest() != row.weights_sha256:
            raise StorageError(f"weights of {name} v{row.version} are damaged: sha256 differs")
        return frame

    def weights(self, name: str, version: int | None = None) -> list[np.ndarray]:
        """The version's weights: read-only arrays that are views over one buffer (zero-copy decode)."""
        frame = self.weights_frame(name, version)
        try:
            return decode_weights(frame)
        except DecodeError as err:
            raise StorageError(f"weights of {name} v{version or 'latest'} do not decode: {err}") from err

    def diff(self, name: str, version_a: int, version_b: int) -> list[LayerDiff]:
        """Per-array L2 norms of ``weights(b) - weights(a)`` (see :func:`layer_diffs`)."""
        return layer_diffs(self.weights(name, version_a), self.weights(name, version_b))

    def store_version_in(
        self,
        session: Session,
        model: Model,
        weights: Sequence[np.ndarray],
        *,
        parent: ModelVersion,
        round_id: int | None = None,
        strategy: str | None = None,
        strategy_config: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        timestamp_id: int | None = None,
        note: str | None = None,
    ) -> ModelVersion:
        """Store the next version inside the caller's transaction, checked against its parent's layout.

        The round engine calls this in the transaction that closes the round that made the version,
        so a crash never leaves a version without its round (or the other way round).
        """
        count, _, layout = layout_of(weights)
        if layout != parent.layout_sha256:
            raise IncompatibleModelError(
                f"weights do not match {model.name} v{parent.version}: {count} arrays or their shapes/dtypes "
                f"differ from the parent's {parent.array_count}"
            )
        return self._store_version(
            session,
            model,
            weights,
            parent=parent,
            round_id=round_id,
            strategy=strategy,
            strategy_config=strategy_config,
            metrics=metrics,
            timestamp_id=timestamp_id,
            note=note,
        )

    # ------------------------------------------------------------------------------------ helpers

    def _model(self, session: Session, name: str, *, lock: bool = False) -> Model:
        query = select(Model).where(Model.name == name)
        if lock and self.db.backend == "postgresql":
            query = query.with_for_update()
        model = session.scalar(query)
        if model is None:
            raise NotFoundError(f"model {name!r} does not exist (see `fedmq models list`)")
        return model

    def _version_row(self, session: Session, model: Model, version: int | None) -> ModelVersion:
        number = self._latest_number(session, model) if version is None else version
        row = session.scalar(
            select(ModelVersion).where(ModelVersion.model_pk == model.id, ModelVersion.version == number)
        )
        if row is None:
            latest = self._latest_number(session, model)
            raise NotFoundError(f"model {model.name!r} has no version {number} (versions 1..{latest})")
        return row

    @staticmethod
    def _latest_number(session: Session, model: Model) -> int:
        return (
            session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_pk == model.id))
            or 0
        )

    @staticmethod
    def _next_timestamp(session: Session, model: Model, requested: int | None) -> int:
        """dafne's ``timestamp_id``: the requested one, else now in seconds, kept increasing per model."""
        if requested is not None:
            return int(requested)
        last = session.scalar(
            select(func.max(ModelVersion.timestamp_id)).where(ModelVersion.model_pk == model.id)
        )
        return max(int(time.time()), (last or 0) + 1)

    def _store_version(
        self,
        session: Session,
        model: Model,
        weights: Sequence[np.ndarray],
        *,
        parent: ModelVersion | None,
        round_id: int | None = None,
        strategy: str | None = None,
        strategy_config: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        timestamp_id: int | None = None,
        note: str | None = None,
    ) -> ModelVersion:
        frame = b"".join(layout_frame(weights).parts)
        blob = write_blob(session, frame)
        self.frames.put(blob.sha256, frame)  # the next round's base and the release read it
        count, params, layout = layout_of(weights)
        number = self._latest_number(session, model) + 1
        manifest = version_manifest(
            model.name, number, parent.version if parent else None, blob.sha256, blob.size, model.code_sha256
        )
        row = ModelVersion(
            model_pk=model.id,
            version=number,
            parent_id=parent.id if parent else None,
            weights_blob_id=blob.id,
            weights_sha256=blob.sha256,
            weights_size=blob.size,
            array_count=count,
            parameter_count=params,
            layout_sha256=layout,
            signature=sign_version(self.signer, manifest, model.name, number),
            round_id=round_id,
            strategy=strategy,
            strategy_config=strategy_config,
            metrics=metrics,
            timestamp_id=self._next_timestamp(session, model, timestamp_id),
            status=VERSION_ACTIVE,
            note=note,
        )
        session.add(row)
        session.flush()
        return row
