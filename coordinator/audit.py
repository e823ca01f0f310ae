"""The exactly-once audit: is every delta in SQL counted once, and is every version whole?

One function, :func:`audit_rounds`, reads the round state (rounds, tasks, deltas, versions) and
checks what DESIGN.md promises for a ``kill -9`` at any moment. Every fault test calls it at its
end (on SQLite and PostgreSQL) and ``fedmq bench load`` reports it. It checks:

- every accepted delta is in exactly one aggregated version or still pending in an open round: a
  row ``aggregated`` belongs to a closed round that has its version; a row still ``accepted``
  belongs to an open round (a round that failed or was cancelled drops its accepted deltas by its
  rule: counted as *dropped*, not an error);
- none twice: at most one accepted row per task; a task marked done has exactly one (and a task
  with one is done); a delta whose publish the sender saw confirmed (``confirmed`` task ids) has a
  row, accepted, aggregated or rejected with its reason: it was never silently lost;
- each version counts its deltas: its ``deltas`` metric equals the rows aggregated into it, its
  ``samples`` metric their sample counts;
- as many versions as closed rounds: each closed round has exactly one version made by it (its
  ``round_id``, the round's base as parent, the round's ``result_version_id``); no other round has
  one; auditing everything, no version names a round that does not exist. So for a run, versions
  = its closed rounds + the base it started from;
- no half-written version: each version's stored weights read back with their sha256, decode,
  and have the array count, shapes and dtypes of their model's first version;
- FedAvg rounds (strategy ``fedavg``) are recomputed in float64 as base + server_lr x the
  sample-weighted (in async runs also staleness-weighted) mean of their aggregated deltas, so a
  delta added twice to the weights themselves, or left out, is caught too.

Violations are counted as *lost* (a delta no version counts), *duplicated* (one counted twice),
*bad version* and *not FedAvg*; :attr:`Audit.problems` says what each one was.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import InstrumentedAttribute, Session

from common import codec
from common.errors import FedmqError
from coordinator.db.blobs import read_blob
from coordinator.db.engine import Database
from coordinator.db.models import Delta, ModelVersion, Round, Task
from coordinator.rounds import staleness_weight

ACCEPTED = ("accepted", "aggregated")
LOST, DUPLICATED, BAD_VERSION, NOT_FEDAVG = "lost", "duplicated", "bad version", "not FedAvg"
FEDAVG_OPTIONS = {"server_lr", "accumulate"}  # no clipping, no noise
FEDAVG_TOLERANCE = 1e-5  # absolute and relative, float64 recomputation vs the stored float32 version

Layout = list[tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class Audit:
    """What :func:`audit_rounds` found; ``ok`` when nothing was lost, duplicated or half-written."""

    tasks: int
    accepted: int  # delta rows accepted or aggregated
    rejected: int
    pending: int  # accepted rows waiting in open rounds
    dropped: int  # accepted rows of rounds that failed or were cancelled
    unanswered: int  # tasks without a delta row (still pending, failed or cancelled)
    closed_rounds: int
    versions: int  # versions made by the audited rounds
    lost: int
    duplicated: int
    bad_versions: int
    not_fedavg: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


class _Findings:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []

    def add(self, kind: str, what: str, n: int = 1) -> None:
        self.counts[kind] += n
        self.problems.append(f"{kind}: {what}")


def audit_rounds(
    db: Database,
    run_ids: Iterable[str] | None = None,
    confirmed: Collection[str] = (),
    check_fedavg: bool = True,
) -> Audit:
    """Audit the rounds of ``run_ids`` (every round when ``None``); see the module docstring.

    ``confirmed``: task ids whose delta the sender's broker confirmed (a worker's log, a simulated
    worker's report); each must have reached SQL.
    """
    found = _Findings()
    with db.session() as session:
        query = select(Round).order_by(Round.id)
        if run_ids is not None:
            query = query.where(Round.run_id.in_(list(run_ids)))
        rounds = {r.id: r for r in session.scalars(query)}
        tasks: list[Task] = _rows_where(session, Task, Task.round_id, list(rounds))
        task_ids = {t.task_id for t in tasks}
        deltas: dict[int, Delta] = {
            d.id: d for d in _rows_where(session, Delta, Delta.round_id, list(rounds))
        }
        # An async task's delta counts in the buffer open when it arrived: a row of another round.
        for d in _rows_where(session, Delta, Delta.task_id, sorted(task_ids)):
            deltas.setdefault(d.id, d)
        accepted = [d for d in deltas.values() if d.status in ACCEPTED]
        _check_deltas(found, rounds, tasks, accepted)
        recorded = {d.task_id for d in deltas.values()}
        unknown = sorted(set(confirmed) - recorded)
        recorded |= {d.task_id for d in _rows_where(session, Delta, Delta.task_id, unknown)}
        for task_id in sorted(set(confirmed) - recorded):
            found.add(LOST, f"task {task_id}'s delta was confirmed to its sender but never recorded")
        versions = _check_versions(found, session, rounds, accepted, check_fedavg, everything=run_ids is None)
    waiting = Counter(d.round_id for d in accepted if d.status == "accepted" and d.round_id in rounds)
    return Audit(
        tasks=len(tasks),
        accepted=len(accepted),
        rejected=sum(1 for d in deltas.values() if d.status == "rejected"),
        pending=sum(n for rid, n in waiting.items() if rounds[rid].state == "open"),
        dropped=sum(n for rid, n in waiting.items() if rounds[rid].state in ("failed", "cancelled")),
        unanswered=len(task_ids - recorded),
        closed_rounds=sum(1 for r in rounds.values() if r.state == "closed"),
        versions=versions,
        lost=found.counts[LOST],
        duplicated=found.counts[DUPLICATED],
        bad_versions=found.counts[BAD_VERSION],
        not_fedavg=found.counts[NOT_FEDAVG],
        problems=tuple(found.problems),
    )


def _rows_where(
    session: Session, entity: Any, column: InstrumentedAttribute[Any], values: Sequence[Any]
) -> list[Any]:
    """Rows of ``entity`` whose ``column`` is in ``values`` (asked 500 values at a time)."""
    rows: list[Any] = []
    for i in range(0, len(values), 500):
        rows += session.scalars(select(entity).where(column.in_(values[i : i + 500]))).all()
    return rows


def _check_deltas(
    found: _Findings, rounds: dict[int, Round], tasks: list[Task], accepted: list[Delta]
) -> None:
    for d in accepted:
        round_ = rounds.get(d.round_id) if d.round_id is not None else None
        if round_ is None:
            found.add(LOST, f"accepted delta {d.id} ({d.worker_name}) is in no audited round")
        elif d.status == "aggregated" and (round_.state != "closed" or round_.result_version_id is None):
            found.add(
                LOST, f"delta {d.id} ({d.worker_name}) is aggregated in {round_.state} round {round_.id}"
            )
        elif d.status == "accepted" and round_.state == "closed":
            found.add(LOST, f"delta {d.id} ({d.worker_name}) is still accepted in closed round {round_.id}")
    per_task = Counter(d.task_id for d in accepted if d.task_id is not None)
    for task_id, n in sorted(per_task.items()):
        if n > 1:
            found.add(DUPLICATED, f"task {task_id} has {n} accepted deltas", n - 1)
    for task in tasks:
        if task.state == "done" and per_task[task.task_id] == 0:
            found.add(LOST, f"task {task.task_id} is done without an accepted delta")
        elif task.state != "done" and per_task[task.task_id] > 0:
            found.add(LOST, f"task {task.task_id} has an accepted delta but is {task.state}")


def _check_versions(
    found: _Findings,
    session: Session,
    rounds: dict[int, Round],
    accepted: list[Delta],
    check_fedavg: bool,
    everything: bool,
) -> int:
    """Each closed round has one whole version counting its deltas; return the versions rounds made."""
    if everything:
        made = list(session.scalars(select(ModelVersion).where(ModelVersion.round_id.is_not(None))))
    else:
        made = _rows_where(session, ModelVersion, ModelVersion.round_id, list(rounds))
    by_round: dict[int, list[ModelVersion]] = defaultdict(list)
    for v in made:
        if v.round_id not in rounds:
            found.add(BAD_VERSION, f"v{v.version} names round {v.round_id}, which does not exist")
        by_round[v.round_id or 0].append(v)
    layouts: dict[int, Layout | None] = {}
    for round_ in rounds.values():
        versions = by_round.get(round_.id, [])
        if round_.state != "closed":
            if versions or round_.result_version_id is not None:
                found.add(BAD_VERSION, f"{round_.state} round {round_.id} has a version")
            continue
        if len(versions) != 1 or round_.result_version_id != versions[0].id:
            found.add(
                BAD_VERSION,
                f"closed round {round_.id} made {len(versions)} versions (its result: {round_.result_version_id})",
            )
            continue
        version = versions[0]
        rows = [d for d in accepted if d.round_id == round_.id and d.status == "aggregated"]
        metrics = version.metrics or {}
        if not isinstance(metrics.get("deltas"), int) or not isinstance(metrics.get("samples"), int):
            found.add(BAD_VERSION, f"v{version.version} does not record its deltas and samples: {metrics}")
            continue
        counted = metrics["deltas"]
        if counted > len(rows):
            found.add(
                DUPLICATED,
                f"v{version.version} counts {counted} deltas, {len(rows)} aggregated",
                counted - len(rows),
            )
        elif counted < len(rows):
            found.add(
                LOST,
                f"v{version.version} counts {counted} deltas, {len(rows)} aggregated",
                len(rows) - counted,
            )
        samples = sum(d.sample_count for d in rows)
        if metrics["samples"] != samples:
            found.add(
                BAD_VERSION, f"v{version.version} counts {metrics['samples']} samples, its rows {samples}"
            )
        if version.parent_id != round_.base_version_id:
            found.add(
                BAD_VERSION, f"v{version.version} of round {round_.id} is not made from the round's base"
            )
            continue
        new = _whole_weights(found, session, version, _first_layout(session, version, layouts))
        recompute = check_fedavg and bool(rows) and _plain_fedavg(round_, version)
        if new is not None and recompute and not _is_fedavg(session, round_, version, rows, new):
            found.add(
                NOT_FEDAVG, f"v{version.version} is not FedAvg of round {round_.id}'s {len(rows)} deltas"
            )
    return len(made)


def _layout(weights: Sequence[np.ndarray]) -> Layout:
    return [(tuple(w.shape), str(w.dtype)) for w in weights]


def _first_layout(session: Session, version: ModelVersion, cache: dict[int, Layout | None]) -> Layout | None:
    """The array shapes and dtypes of the model's first version (None if it does not decode)."""
    if version.model_pk not in cache:
        first = session.scalar(
            select(ModelVersion)
            .where(ModelVersion.model_pk == version.model_pk)
            .order_by(ModelVersion.version)
            .limit(1)
        )
        try:
            cache[version.model_pk] = (
                _layout(codec.decode_weights(read_blob(session, first.weights_blob_id))) if first else None
            )
        except FedmqError:
            cache[version.model_pk] = None
    return cache[version.model_pk]


def _whole_weights(
    found: _Findings, session: Session, version: ModelVersion, layout: Layout | None
) -> list[np.ndarray] | None:
    """The version's weights if they are whole (read back, sha256, decode, the model's layout)."""
    try:
        frame = read_blob(session, version.weights_blob_id)
        if hashlib.sha256(frame).hexdigest() != version.weights_sha256:
            raise FedmqError("its weights' sha256 differs from the version's")
        weights = codec.decode_weights(frame)
    except FedmqError as exc:
        found.add(BAD_VERSION, f"v{version.version} is half-written: {exc}")
        return None
    if layout is None or _layout(weights) != layout:
        found.add(
            BAD_VERSION,
            f"v{version.version} is half-written: its arrays are not the base's shapes and dtypes",
        )
        return None
    return weights


def _plain_fedavg(round_: Round, version: ModelVersion) -> bool:
    """A FedAvg round without clipping or noise (the only ones recomputed)."""
    options = (version.strategy_config or {}).get("options", {})
    return round_.strategy == "fedavg" and isinstance(options, dict) and set(options) <= FEDAVG_OPTIONS


def _is_fedavg(
    session: Session, round_: Round, version: ModelVersion, rows: list[Delta], new: list[np.ndarray]
) -> bool:
    """Is ``new`` the round's base plus server_lr x the weighted mean of ``rows``' deltas (float64)?"""
    server_lr = float((version.strategy_config or {}).get("options", {}).get("server_lr", 1.0))
    base_row = session.get(ModelVersion, round_.base_version_id)
    if base_row is None:
        return False
    base = codec.decode_weights(read_blob(session, base_row.weights_blob_id))
    sums = [np.zeros(b.shape, np.float64) for b in base]
    total = 0.0
    for d in rows:
        if d.weights_blob_id is None:
            return False
        weight = d.sample_count * staleness_weight(int((d.metrics or {}).get("staleness", 0)))
        total += weight
        for s, w in zip(sums, codec.decode_weights(read_blob(session, d.weights_blob_id)), strict=True):
            s += weight * w.astype(np.float64)
    if total <= 0:
        return False
    return all(
        np.allclose(
            n.astype(np.float64),
            b.astype(np.float64) + server_lr * s / total,
            rtol=FEDAVG_TOLERANCE,
            atol=FEDAVG_TOLERANCE,
        )
        for n, b, s in zip(new, base, sums, strict=True)
        if np.issubdtype(n.dtype, np.floating)
    )
