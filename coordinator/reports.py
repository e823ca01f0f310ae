"""Read-only views of runs and rounds for the CLI, the demo and tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from common.errors import NotFoundError
from coordinator.db.engine import Database
from coordinator.db.models import Delta, Model, ModelVersion, Round, Run, Task


@dataclass(frozen=True)
class DeltaView:
    worker: str | None
    status: str
    sample_count: int
    norm: float | None
    reason: str | None


@dataclass(frozen=True)
class RoundView:
    id: int
    number: int
    state: str
    base_version: int | None
    result_version: int | None
    tasks: int
    answered: int
    accepted: int
    reason: str | None
    metrics: dict[str, Any]
    deltas: list[DeltaView] = field(default_factory=list)


@dataclass(frozen=True)
class RunView:
    run_id: str
    model: str
    state: str
    rounds_total: int
    rounds_done: int
    strategy: str
    reason: str | None
    created_at: str
    rounds: list[RoundView] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _version_number(session: Any, version_id: int | None) -> int | None:
    if version_id is None:
        return None
    row = session.get(ModelVersion, version_id)
    return row.version if row else None


def run_view(db: Database, run_id: str) -> RunView:
    with db.session() as session:
        run = session.scalar(select(Run).where(Run.run_id == run_id))
        if run is None:
            raise NotFoundError(f"run {run_id!r} does not exist (see `fedmq rounds list`)")
        model = session.get(Model, run.model_pk)
        rounds = []
        for r in session.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.number)):
            tasks = list(session.scalars(select(Task).where(Task.round_id == r.id)))
            deltas = list(session.scalars(select(Delta).where(Delta.round_id == r.id).order_by(Delta.id)))
            result = session.get(ModelVersion, r.result_version_id) if r.result_version_id else None
            rounds.append(
                RoundView(
                    id=r.id,
                    number=r.number,
                    state=r.state,
                    base_version=_version_number(session, r.base_version_id),
                    result_version=result.version if result else None,
                    tasks=len(tasks),
                    answered=sum(1 for t in tasks if t.state != "pending"),
                    accepted=sum(1 for d in deltas if d.status in ("accepted", "aggregated")),
                    reason=r.reason,
                    metrics=dict(result.metrics or {}) if result else {},
                    deltas=[
                        DeltaView(d.worker_name, d.status, d.sample_count, d.norm, d.rejection_reason)
                        for d in deltas
                    ],
                )
            )
        return RunView(
            run_id=run.run_id,
            model=model.name if model else "?",
            state=run.state,
            rounds_total=run.rounds_total,
            rounds_done=run.rounds_done,
            strategy=run.strategy,
            reason=run.reason,
            created_at=run.created_at.isoformat(),
            rounds=rounds,
        )


def list_runs(db: Database, limit: int = 50) -> list[RunView]:
    with db.session() as session:
        ids = list(session.scalars(select(Run.run_id).order_by(Run.id.desc()).limit(limit)))
    return [run_view(db, run_id) for run_id in ids]


def rejected_deltas(db: Database) -> list[DeltaView]:
    """Every rejected delta (including those of no known task), newest first."""
    with db.session() as session:
        rows = session.scalars(select(Delta).where(Delta.status == "rejected").order_by(Delta.id.desc()))
        return [DeltaView(d.worker_name, d.status, d.sample_count, d.norm, d.rejection_reason) for d in rows]
