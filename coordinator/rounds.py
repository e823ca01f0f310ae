"""Round state in SQL: runs, rounds, tasks, deltas — every step one transaction.

The broker is transport; this module is the source of truth. Each public method of
:class:`RoundEngine` runs in one database transaction that also writes the messages it wants sent
to the outbox (a relay publishes them after commit), so a crash at any moment leaves either the
state before the step or the state after it, never half of it:

- ``start_run``: a run, its first round, one task per chosen worker, and the task messages.
- ``record_delta``: a delta is validated, stored and marked accepted (or rejected with its reason)
  together with its task; a second delivery of the same task's delta changes nothing.
- ``advance``: a round whose rule is met (every task answered, or the deadline passed with a
  quorum) is aggregated with its strategy into the next version, stored with its lineage, closed,
  announced (release message), and the run's next round opened — all in one transaction. A round
  past its deadline without a quorum fails with that reason, and so does its run.

Idempotency keys: the run id (a resubmitted StartRun is ignored), the task id (one delta per task),
the round's state checked under the round's row lock before aggregating.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import math
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar, cast

import numpy as np
from sqlalchemy import Table, exists, func, select, update
from sqlalchemy.orm import Session

from common import codec
from common.broker.topology import RELEASES_EXCHANGE, TASKS_EXCHANGE
from common.errors import ConfigError, DecodeError, NotFoundError
from common.faults import fault_point
from common.messages import CancelRun, DeltaReport, StartRun, TaskFailed, TrainTask
from coordinator.control import check_start_run
from coordinator.db.blobs import FileRegion, read_blob, write_blob, write_blobs
from coordinator.db.bulk import insert_rows
from coordinator.db.engine import Database
from coordinator.db.models import Delta, Model, ModelVersion, OutboxMessage, Round, Run, Task, Worker
from coordinator.registry import ModelRegistry
from coordinator.running import CommittedDelta, RunningAggregations
from coordinator.strategies import get_strategy
from coordinator.strategies.base import Aggregation
from coordinator.validation import DeltaPolicy, DeltaRejectedError, validate_delta

logger = logging.getLogger(__name__)

RUN_RUNNING, RUN_COMPLETED, RUN_FAILED, RUN_CANCELLED = "running", "completed", "failed", "cancelled"
ROUND_OPEN, ROUND_CLOSED, ROUND_FAILED, ROUND_CANCELLED = "open", "closed", "failed", "cancelled"
TASK_PENDING, TASK_DONE, TASK_FAILED, TASK_CANCELLED = "pending", "done", "failed", "cancelled"
DELTA_ACCEPTED, DELTA_REJECTED, DELTA_AGGREGATED = "accepted", "rejected", "aggregated"
RELEASE_HEADER = "x-fedmq-release"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class DeltaOutcome:
    """What became of one delivered delta."""

    status: str  # accepted | duplicate | rejected
    reason: str = ""
    round_id: int | None = None
    # The round was, when the delta committed, a synchronous one waiting for more answers before
    # its deadline: advancing it then changes nothing (the ticker sees to the deadline).
    round_waits: bool = False


def release_outbox_row(model: str, version: int) -> OutboxMessage:
    """An outbox row announcing a version; the relay builds the (large) body when it publishes."""
    return OutboxMessage(
        message_id=f"release-{model}-{version}",
        exchange=RELEASES_EXCHANGE,
        routing_key="",
        headers={RELEASE_HEADER: [model, version]},
        body=None,
    )


_Row = TypeVar("_Row", Round, Worker, ModelVersion)


class _TaskRow(NamedTuple):
    """What the intake reads of a task (plain values: loading ORM rows was a tenth of its time)."""

    task_id: str
    round_id: int
    worker_id: int | None
    state: str


@dataclass(slots=True)
class _Accepted:
    """An accepted delta's row before it is inserted (received_at: the column's default)."""

    task_id: str
    round_id: int
    worker_id: int
    worker_name: str
    base_version_id: int
    sample_count: int
    norm: float
    metrics: dict[str, Any]
    status: str = DELTA_ACCEPTED
    id: int | None = None  # set by _Intake.store


_DELTA_COLUMNS = tuple(f for f in _Accepted.__dataclass_fields__ if f != "id")
_DELTAS, _TASKS, _WORKERS = (cast(Table, entity.__table__) for entity in (Delta, Task, Worker))


@dataclass
class _Intake:
    """One transaction's worth of deltas: rows they share, looked up once, and what they add.

    Reads made here never see the rows added in the same transaction (the session does not flush
    until the end), so what the deltas change is tracked beside them: ``answered`` (tasks that have
    a delta row) and the accepted count of each async buffer.
    """

    session: Session
    tasks: dict[str, _TaskRow]
    answered: set[str]
    full_buffer: int | None = None  # an async round whose buffer the last delta filled
    _rows: dict[tuple[type, int], object] = field(default_factory=dict)
    _runs: dict[str, Run | None] = field(default_factory=dict)
    _buffers: dict[str, Round | None] = field(default_factory=dict)
    _counts: dict[int, int] = field(default_factory=dict)
    _accepted: list[tuple[_Accepted, memoryview, FileRegion | None]] = field(default_factory=list)
    _failed: list[str] = field(default_factory=list)  # pending tasks a rejected delta answered
    seen: dict[int, Worker] = field(default_factory=dict)  # workers whose delta was accepted
    decoded: list[tuple[_Accepted, list[np.ndarray], float, int]] = field(default_factory=list)

    @classmethod
    def load(cls, session: Session, task_ids: Sequence[str]) -> _Intake:
        tasks: dict[str, _TaskRow] = {}
        answered: set[str] = set()
        unique = sorted(set(task_ids))
        for i in range(0, len(unique), 500):
            part = unique[i : i + 500]
            rows = session.execute(
                select(Task.task_id, Task.round_id, Task.worker_id, Task.state, Delta.id)
                .outerjoin(Delta, Delta.task_id == Task.task_id)
                .where(Task.task_id.in_(part))
            )
            for task_id, round_id, worker_id, state, delta_id in rows:
                tasks[task_id] = _TaskRow(task_id, round_id, worker_id, state)
                if delta_id is not None:
                    answered.add(task_id)
        return cls(session, tasks, answered)

    def get(self, entity: type[_Row], pk: int) -> _Row | None:
        """``session.get``, holding the row for the whole transaction (the session's identity map
        holds rows weakly: without this, each delta would load the same round, worker and version)."""
        key = (entity, pk)
        if key not in self._rows:
            self._rows[key] = self.session.get(entity, pk)
        return self._rows[key]  # type: ignore[return-value]

    def run(self, run_id: str | None) -> Run | None:
        if run_id is None:
            return None
        if run_id not in self._runs:
            self._runs[run_id] = self.session.scalar(select(Run).where(Run.run_id == run_id))
        return self._runs[run_id]

    def open_buffer(self, run_id: str) -> Round | None:
        """The open round of an async run: the buffer its deltas go to."""
        if run_id not in self._buffers:
            self._buffers[run_id] = self.session.scalar(
                select(Round)
                .where(Round.run_id == run_id, Round.state == ROUND_OPEN)
                .order_by(Round.number.desc())
            )
        return self._buffers[run_id]

    def count_in_buffer(self, round_: Round) -> int:
        """Accepted deltas of ``round_``, counting those of this transaction."""
        if round_.id not in self._counts:
            self._counts[round_.id] = (
                self.session.scalar(
                    select(func.count()).where(Delta.round_id == round_.id, Delta.status == DELTA_ACCEPTED)
                )
                or 0
            )
            self._counts[round_.id] += sum(1 for row, _, _ in self._accepted if row.round_id == round_.id)
        return self._counts[round_.id]

    def accept(self, row: _Accepted, weights: memoryview | bytes, source: FileRegion | None = None) -> None:
        """Add an accepted delta (its task done); :meth:`store` writes it with the others.
        ``source``: a file already holding ``weights`` (coordinator/db/blobs.py)."""
        self._accepted.append((row, memoryview(weights), source))
        self.answered.add(row.task_id)
        if row.round_id in self._counts:
            self._counts[row.round_id] += 1

    def fail_task(self, task: _TaskRow) -> None:
        """A rejected delta from its own worker answers its task: failed, if still pending."""
        self.answered.add(task.task_id)
        if task.state == TASK_PENDING:
            self._failed.append(task.task_id)

    def waiting_rounds(self, round_ids: set[int], now: dt.datetime) -> set[int]:
        """Of ``round_ids``, the open synchronous rounds that still have a pending task and whose
        deadline is ahead (their rule cannot close or fail them yet), as this transaction sees it."""
        candidates = []
        for round_id in round_ids:
            round_ = self.get(Round, round_id)
            run = self.run(round_.run_id) if round_ is not None else None
            if round_ is None or round_.state != ROUND_OPEN or run is None or run.mode == "async":
                continue
            if round_.deadline is None or now < round_.deadline:
                candidates.append(round_id)
        return {  # one EXISTS each: it stops at the first pending task of the (round, state) index
            round_id
            for round_id in candidates
            if self.session.scalar(
                select(exists().where(Task.round_id == round_id, Task.state == TASK_PENDING))
            )
        }

    def store(self, done_at: dt.datetime) -> None:
        """Write the accepted deltas, their weights and their tasks' new state in a few statements
        for all (the unit of work would issue one per row); each ``row`` gets its id."""
        self._set_state(self._failed, TASK_FAILED, done_at, only_pending=True)
        if not self._accepted:
            return
        blob_ids = write_blobs(
            self.session,
            [weights for _, weights, _ in self._accepted],
            [source for _, _, source in self._accepted],
        )
        values = [
            {column: getattr(row, column) for column in _DELTA_COLUMNS} | {"weights_blob_id": blob_id}
            for (row, _, _), blob_id in zip(self._accepted, blob_ids, strict=True)
        ]
        # Core, not the ORM's bulk insert: the rows are plain values here (its per-row bookkeeping
        # was a fifth of the results thread's time at ~1000 small deltas/s)
        inserted = insert_rows(self.session, _DELTAS, values)
        for (row, _, _), delta_id in zip(self._accepted, inserted, strict=True):
            row.id = delta_id
        self._set_state([row.task_id for row, _, _ in self._accepted], TASK_DONE, done_at)
        self.session.execute(  # Core statements here: the ORM's update machinery costs more per batch
            update(_WORKERS).where(_WORKERS.c.id.in_(list(self.seen))).values(last_seen_at=done_at)
        )

    def _set_state(
        self, task_ids: list[str], state: str, done_at: dt.datetime, only_pending: bool = False
    ) -> None:
        for i in range(0, len(task_ids), 500):
            query = update(_TASKS).where(_TASKS.c.task_id.in_(task_ids[i : i + 500]))
            if only_pending:
                query = query.where(_TASKS.c.state == TASK_PENDING)
            self.session.execute(query.values(state=state, done_at=done_at))


class RoundEngine:
    """The coordinator's round logic over SQL (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        registry: ModelRegistry,
        policy: DeltaPolicy | None = None,
        worker_timeout_s: float = 300.0,
        clock: Callable[[], dt.datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.db = db
        self.registry = registry
        self.policy = policy or DeltaPolicy()
        self.worker_timeout_s = worker_timeout_s
        self.clock = clock
        self.rng = rng or random.Random()
        self._base_cache: dict[int, list[np.ndarray]] = {}
        self.running = RunningAggregations()
        self._eval_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # -------------------------------------------------------------------------------- runs

    def start_run(self, msg: StartRun) -> bool:
        """Record a run and open its first round. False when the run id is already known."""
        check_start_run(msg)  # the CLI's own check: ConfigError before anything is written
        with self.db.session(write=True) as session:
            if session.scalar(select(Run.id).where(Run.run_id == msg.run_id)) is not None:
                logger.info("run %s already recorded; ignoring the duplicate submission", msg.run_id)
                return False
            model = session.scalar(select(Model).where(Model.name == msg.model))
            if model is None:
                raise NotFoundError(f"model {msg.model!r} does not exist")
            run = Run(
                run_id=msg.run_id,
                model_pk=model.id,
                state=RUN_RUNNING,
                mode=msg.mode,
                rounds_total=msg.rounds,
                min_workers=msg.min_workers,
                fraction=msg.fraction,
                workers=list(msg.workers),
                deadline_s=msg.deadline_s,
                strategy=msg.strategy,
                strategy_options=dict(msg.options),
                train_options=dict(msg.train),
                eval_data=msg.eval_data,
                max_staleness=msg.max_staleness if msg.mode == "async" else None,
                max_norm=msg.max_norm,
                max_samples=msg.max_samples,
            )
            session.add(run)
            session.flush()
            base = self._latest_active_version(session, model)
            try:
                with session.begin_nested():
                    self._open_round(session, run, model, base, number=1)
            except ConfigError as exc:
                # Recorded, so `fedmq rounds show` tells the submitter why nothing happens.
                run.state, run.reason, run.finished_at = RUN_FAILED, str(exc), self.clock()
                logger.warning("run %s refused: %s", msg.run_id, exc)
                return True
        logger.info("run %s: %d rounds of %s started", msg.run_id, msg.rounds, msg.model)
        return True

    def cancel_run(self, msg: CancelRun) -> bool:
        with self.db.session(write=True) as session:
            run = session.scalar(select(Run).where(Run.run_id == msg.run_id))
            if run is None:
                raise NotFoundError(f"run {msg.run_id!r} does not exist")
            if run.state != RUN_RUNNING:
                return False
            run.state, run.reason, run.finished_at = RUN_CANCELLED, msg.reason, self.clock()
            open_ids = list(
                session.scalars(select(Round.id).where(Round.run_id == run.run_id, Round.state == ROUND_OPEN))
            )
            session.execute(
                update(Round)
                .where(Round.id.in_(open_ids))
                .values(state=ROUND_CANCELLED, reason=msg.reason, closed_at=self.clock())
            )
            self._cancel_pending_tasks(session, open_ids)
        return True

    # ------------------------------------------------------------------------------ rounds

    def _latest_active_version(self, session: Session, model: Model) -> ModelVersion:
        row = session.scalar(
            select(ModelVersion)
            .where(ModelVersion.model_pk == model.id, ModelVersion.status == "active")
            .order_by(ModelVersion.version.desc())
            .limit(1)
        )
        if row is None:
            raise NotFoundError(f"model {model.name!r} has no active version")
        return row

    def _choose_workers(self, session: Session, run: Run) -> list[Worker]:
        active = list(session.scalars(select(Worker).where(Worker.status == "active").order_by(Worker.name)))
        if run.workers:
            named = [w for w in active if w.name in set(run.workers)]
            missing = set(run.workers) - {w.name for w in named}
            if missing:
                raise ConfigError(f"unknown or revoked workers: {', '.join(sorted(missing))}")
            return named
        # Workers heard from recently come first; the others fill up to the quorum (their tasks
        # wait in their durable queues until they connect).
        cutoff = self.clock() - dt.timedelta(seconds=self.worker_timeout_s)
        alive = [w for w in active if w.last_seen_at is not None and w.last_seen_at >= cutoff]
        silent = [w for w in active if w not in alive]
        want = min(len(active), max(run.min_workers, math.ceil(run.fraction * len(alive or active))))
        chosen = self.rng.sample(alive, min(want, len(alive)))
        chosen += self.rng.sample(silent, want - len(chosen))
        return sorted(chosen, key=lambda w: w.name)

    def _open_round(
        self,
        session: Session,
        run: Run,
        model: Model,
        base: ModelVersion,
        number: int,
        issue_tasks: bool = True,
    ) -> Round:
        """Open round ``number`` of ``run`` on ``base``; in sync mode (and an async run's first buffer)
        send a task to each chosen worker. An async round is a buffer of K deltas with no deadline
        of its own beyond ``deadline_s`` from its opening."""
        workers = self._choose_workers(session, run) if issue_tasks else []
        if issue_tasks and len(workers) < run.min_workers:
            raise ConfigError(
                f"run {run.run_id}: {len(workers)} workers available, {run.min_workers} required "
                "(add workers with `fedmq workers add`)"
            )
        now = self.clock()
        round_ = Round(
            model_pk=model.id,
            run_id=run.run_id,
            number=number,
            state=ROUND_OPEN,
            base_version_id=base.id,
            strategy=run.strategy,
            strategy_config={"strategy": run.strategy, "options": run.strategy_options},
            quorum=run.min_workers,
            deadline=now + dt.timedelta(seconds=run.deadline_s),
        )
        session.add(round_)
        session.flush()
        for worker in workers:
            self._issue_task(session, run, round_, model, base, worker)
        if issue_tasks:
            logger.info(
                "run %s round %d: %s v%d to %d workers",
                run.run_id,
                number,
                model.name,
                base.version,
                len(workers),
            )
        return round_

    def _issue_task(
        self, session: Session, run: Run, round_: Round, model: Model, base: ModelVersion, worker: Worker
    ) -> None:
        """One task (and its message, through the outbox) for ``worker`` to train ``base``."""
        task_id = uuid.uuid4().hex
        session.add(
            Task(
                task_id=task_id,
                round_id=round_.id,
                worker_id=worker.id,
                state=TASK_PENDING,
                sent_at=self.clock(),
            )
        )
        message = TrainTask(
            task_id=task_id,
            round_id=round_.id,
            model=model.name,
            version=base.version,
            weights_sha256=base.weights_sha256,
            train={
                **(run.train_options or {}),
                **get_strategy(run.strategy, run.strategy_options).client_options(),
            },
            deadline=round_.deadline.timestamp() if round_.deadline and run.mode == "sync" else None,
        )
        session.add(
            OutboxMessage(
                message_id=f"task-{task_id}",
                exchange=TASKS_EXCHANGE,
                routing_key=worker.name,
                body=message.encode(),
            )
        )

    # ------------------------------------------------------------------------------ deltas

    def record_delta(self, report: DeltaReport, user_id: str | None) -> DeltaOutcome:
        """Validate and store one delta (see the module docstring); never raises for bad deltas."""
        return self.record_deltas([(report, user_id)])[0]

    def record_deltas(
        self,
        items: Sequence[tuple[DeltaReport, str | None]],
        sources: Sequence[FileRegion | None] | None = None,
    ) -> list[DeltaOutcome]:
        """Validate and store deltas (each with the broker user that sent it), in one transaction.

        ``sources[i]``, when given, is the file region holding item i's weight frame (a reassembled
        transfer): its weights are then kept by linking that file instead of writing them again.

        The outcome of each is what :meth:`record_delta` would have given had they come one at a
        time, in order: an asynchronous delta that fills its run's buffer ends the transaction, the
        buffer is aggregated (:meth:`advance`), and the deltas after it go to the next buffer. Raises
        only when the transaction itself fails; then none of them was recorded.
        """
        outcomes: list[DeltaOutcome] = []
        while len(outcomes) < len(items):
            rest = items[len(outcomes) :]
            with contextlib.ExitStack() as feed:
                with self.db.session(write=True) as session, session.no_autoflush:
                    intake = _Intake.load(session, [report.task_id for report, _ in rest])
                    # Announced once this transaction holds SQLite's write lock, before the commit,
                    # so a round closed right after it waits for the feed (coordinator.running).
                    feed.enter_context(self.running.feeding())
                    first = len(outcomes)
                    for report, user_id in rest:
                        source = sources[len(outcomes)] if sources is not None else None
                        outcomes.append(self._record_one(intake, report, user_id, source))
                        if intake.full_buffer is not None:
                            break
                    now = self.clock()
                    intake.store(now)
                    touched = {o.round_id for o in outcomes[first:] if o.round_id is not None}
                    waiting = intake.waiting_rounds(touched, now)
                    if waiting:
                        outcomes[first:] = [
                            dataclasses.replace(o, round_waits=True) if o.round_id in waiting else o
                            for o in outcomes[first:]
                        ]
                self._feed_running(intake)
            if intake.full_buffer is not None:
                self.advance(intake.full_buffer)
        return outcomes

    def _feed_running(self, intake: _Intake) -> None:
        """Committed deltas go on to their rounds' running aggregations (:mod:`coordinator.running`)."""
        committed = [
            CommittedDelta(row.round_id, row.id, arrays, weight, staleness)
            for row, arrays, weight, staleness in intake.decoded
            if row.id is not None  # set when the rows were stored
        ]
        try:
            self.running.feed(committed, self._start_running)
        except Exception:  # only an optimisation: the round then aggregates from SQL
            logger.exception("running aggregation failed; the round will aggregate from SQL")

    def _start_running(self, round_id: int) -> tuple[Aggregation, int | None] | None:
        with self.db.session() as session:
            round_ = session.get(Round, round_id)
            if round_ is None or round_.state != ROUND_OPEN:
                return None
            aggregation, run = self._begin_aggregation(session, round_)
            return (aggregation, run.server_state_blob_id) if aggregation.streaming else None

    def _begin_aggregation(self, session: Session, round_: Round) -> tuple[Aggregation, Run]:
        """The round's strategy begun on its base, from the run's server state."""
        run = session.scalar(select(Run).where(Run.run_id == round_.run_id))
        assert run is not None
        state = (
            [np.array(a) for a in codec.decode_weights(read_blob(session, run.server_state_blob_id))]
            if run.server_state_blob_id is not None
            else None
        )
        strategy = get_strategy(run.strategy, run.strategy_options)
        return strategy.begin(self._base_weights(session, round_), state), run

    def _record_one(
        self, intake: _Intake, report: DeltaReport, user_id: str | None, source: FileRegion | None = None
    ) -> DeltaOutcome:
        session = intake.session
        task = intake.tasks.get(report.task_id)
        if task is not None and task.task_id in intake.answered:
            return DeltaOutcome("duplicate", "this task's delta was already received", task.round_id)
        staleness = 0
        try:
            run = self._run_of(intake, task)
            if run is not None and task is not None and run.mode == "async":
                round_, worker, staleness = self._check_async_report(intake, report, task, run, user_id)
            else:
                round_, worker = self._check_report(intake, report, task, user_id)
            assert task is not None
            base_weights = self._base_weights(session, round_)
            limits = codec.CodecLimits(
                max_total_bytes=codec.weights_nbytes(base_weights) + 1024,
                max_arrays=len(base_weights),
            )
            try:
                delta = codec.decode_weights(report.payload, limits=limits)
            except DecodeError as exc:
                raise DeltaRejectedError(f"weights do not decode: {exc}") from exc
            norm = validate_delta(delta, base_weights, report.sample_count, self._policy(run))
        except DeltaRejectedError as exc:
            if self._store_rejected(intake, report, task, exc.reason, user_id) and task is not None:
                intake.fail_task(task)
            logger.warning("delta for task %s rejected: %s", report.task_id, exc.reason)
            return DeltaOutcome("rejected", exc.reason, task.round_id if task else None)
        row = _Accepted(
            task_id=task.task_id,
            round_id=round_.id,
            worker_id=worker.id,
            worker_name=worker.name,
            base_version_id=self._task_base_id(intake, task),
            sample_count=report.sample_count,
            norm=norm,
            metrics={**report.metrics, "staleness": staleness},
        )
        intake.accept(row, report.payload, source)  # its task is marked done with it
        intake.decoded.append((row, delta, report.sample_count * staleness_weight(staleness), staleness))
        intake.seen[worker.id] = worker  # last seen: when the transaction stores
        if run is not None and run.mode == "async" and intake.count_in_buffer(round_) >= round_.quorum:
            intake.full_buffer = round_.id
        return DeltaOutcome("accepted", round_id=round_.id)

    def _policy(self, run: Run | None) -> DeltaPolicy:
        """The coordinator's delta bounds, tightened by the run's own."""
        if run is None:
            return self.policy
        max_norm = run.max_norm if run.max_norm is not None else self.policy.max_norm
        max_samples = run.max_samples if run.max_samples is not None else self.policy.max_sample_count
        return DeltaPolicy(max_norm=max_norm, max_sample_count=max_samples)

    @staticmethod
    def _run_of(intake: _Intake, task: _TaskRow | None) -> Run | None:
        if task is None:
            return None
        round_ = intake.get(Round, task.round_id)
        return intake.run(round_.run_id) if round_ is not None else None

    @staticmethod
    def _task_base_id(intake: _Intake, task: _TaskRow) -> int:
        round_ = intake.get(Round, task.round_id)
        assert round_ is not None
        return round_.base_version_id

    def _check_worker(
        self, intake: _Intake, report: DeltaReport, task: _TaskRow, user_id: str | None
    ) -> Worker:
        worker = intake.get(Worker, task.worker_id) if task.worker_id is not None else None
        if worker is None or worker.status != "active":
            raise DeltaRejectedError(f"task {report.task_id} has no active worker")
        if report.worker != worker.name:
            raise DeltaRejectedError(f"task {report.task_id} belongs to {worker.name}, not {report.worker}")
        if user_id != worker.name:
            raise DeltaRejectedError(f"sent by broker user {user_id!r}, not by worker {worker.name!r}")
        return worker

    def _check_async_report(
        self, intake: _Intake, report: DeltaReport, task: _TaskRow, run: Run, user_id: str | None
    ) -> tuple[Round, Worker, int]:
        """An async delta counts in the run's open buffer if it is at most ``max_staleness`` behind."""
        worker = self._check_worker(intake, report, task, user_id)
        if run.state != RUN_RUNNING:
            raise DeltaRejectedError(f"run {run.run_id} is {run.state}")
        current = intake.open_buffer(run.run_id)
        if current is None:
            raise DeltaRejectedError(f"run {run.run_id} has no open buffer")
        task_base = intake.get(ModelVersion, self._task_base_id(intake, task))
        current_base = intake.get(ModelVersion, current.base_version_id)
        assert task_base is not None and current_base is not None
        if report.base_version != task_base.version or report.base_weights_sha256 != task_base.weights_sha256:
            raise DeltaRejectedError(
                f"delta against version {report.base_version}, the task trains version {task_base.version}"
            )
        staleness = current_base.version - task_base.version
        if staleness > (run.max_staleness if run.max_staleness is not None else 10):
            raise DeltaRejectedError(
                f"staleness {staleness} exceeds the run's maximum of {run.max_staleness}"
            )
        return current, worker, staleness

    def _check_report(
        self, intake: _Intake, report: DeltaReport, task: _TaskRow | None, user_id: str | None
    ) -> tuple[Round, Worker]:
        if task is None:
            raise DeltaRejectedError(f"unknown task {report.task_id!r}")
        worker = self._check_worker(intake, report, task, user_id)
        round_ = intake.get(Round, task.round_id)
        if round_ is None or round_.id != report.round_id:
            raise DeltaRejectedError(f"task {report.task_id} is not part of round {report.round_id}")
        if round_.state != ROUND_OPEN:
            raise DeltaRejectedError(f"round {round_.id} is {round_.state}")
        base = intake.get(ModelVersion, round_.base_version_id)
        assert base is not None
        if report.base_version != base.version or report.base_weights_sha256 != base.weights_sha256:
            raise DeltaRejectedError(
                f"delta against version {report.base_version}, the round trains version {base.version}"
            )
        return round_, worker

    def _store_rejected(
        self, intake: _Intake, report: DeltaReport, task: _TaskRow | None, reason: str, user_id: str | None
    ) -> bool:
        """Record a rejected delta; True when the row answers its task (its own worker sent it)."""
        # A task keeps at most one delta row, so a rejected delta answers its task only when the task's
        # own worker sent it: anyone else's (a spoofed or misrouted report) is recorded beside the round
        # without blocking the real worker's delta.
        worker = intake.get(Worker, task.worker_id) if task is not None and task.worker_id else None
        own = task is not None and worker is not None and user_id == worker.name
        intake.session.add(
            Delta(
                task_id=task.task_id if task and own else None,
                round_id=task.round_id if task else None,
                worker_id=task.worker_id if task and own else None,
                worker_name=(report.worker if own else f"{report.worker} (sent by {user_id})")[:200],
                sample_count=max(0, min(report.sample_count, 2**62)),
                status=DELTA_REJECTED,
                rejection_reason=reason[:2000],
            )
        )
        return own  # its task, if pending, fails with it (_Intake.fail_task)

    def record_failure(self, msg: TaskFailed, user_id: str | None) -> bool:
        """A worker could not do its task: the task counts as answered (without a delta)."""
        with self.db.session(write=True) as session:
            task = session.scalar(select(Task).where(Task.task_id == msg.task_id))
            if task is None or task.state != TASK_PENDING:
                return False
            worker = session.get(Worker, task.worker_id) if task.worker_id else None
            if worker is None or worker.name != msg.worker or user_id != worker.name:
                return False
            task.state, task.done_at = TASK_FAILED, self.clock()
            logger.warning("task %s failed on %s: %s", msg.task_id, msg.worker, msg.reason)
            return True

    def record_dead_task(self, task_id: str, reason: str) -> bool:
        """The broker dead-lettered a task after its delivery limit (it killed its worker every
        time): the task counts as answered, failed, like a worker's TaskFailed. False when the task
        is unknown or was answered already (a worker that could report sent TaskFailed itself)."""
        with self.db.session(write=True) as session:
            task = session.scalar(select(Task).where(Task.task_id == task_id))
            if task is None or task.state != TASK_PENDING:
                return False
            task.state, task.done_at = TASK_FAILED, self.clock()
            logger.warning("task %s dead-lettered by the broker: %s", task_id, reason)
            return True

    def _base_weights(self, session: Session, round_: Round) -> list[np.ndarray]:
        cached = self._base_cache.get(round_.base_version_id)
        if cached is None:
            version = session.get(ModelVersion, round_.base_version_id)
            assert version is not None
            frame = self.registry.frames.read(session, version.weights_blob_id, version.weights_sha256)
            cached = codec.decode_weights(frame)
            self._base_cache.clear()  # keep one base in memory: rounds of one run share it
            self._base_cache[round_.base_version_id] = cached
        return cached

    # ---------------------------------------------------------------------------- advancing

    def open_round_ids(self) -> list[int]:
        with self.db.session() as session:
            return list(session.scalars(select(Round.id).where(Round.state == ROUND_OPEN)))

    def advance(self, round_id: int) -> str | None:
        """Close, fail or leave a round by its rule; returns the new state (``open`` when an async
        round stays open but new tasks were written), or None if nothing changed.

        The rule is first checked in a read transaction: most deltas leave their round open, and
        then no write lock is taken.
        """
        with self.db.session() as session:
            round_ = session.get(Round, round_id)
            if round_ is None or round_.state != ROUND_OPEN:
                return None
            run = session.scalar(select(Run).where(Run.run_id == round_.run_id))
            is_async = run is not None and run.mode == "async"
            if not is_async and self._sync_rule(session, round_) is None:
                return None
        with self.db.session(write=True) as session:
            query = select(Round).where(Round.id == round_id)
            if self.db.backend == "postgresql":
                query = query.with_for_update()
            round_ = session.scalar(query)
            if round_ is None or round_.state != ROUND_OPEN:
                return None
            run = session.scalar(select(Run).where(Run.run_id == round_.run_id))
            if run is not None and run.mode == "async":
                return self._advance_async(session, run, round_)
            rule = self._sync_rule(session, round_)
            if rule is None:
                return None
            action, reason = rule
            if action == ROUND_CLOSED:
                self._aggregate(session, round_)
            else:
                self._fail_round(session, round_, reason)
            return action

    def _sync_rule(self, session: Session, round_: Round) -> tuple[str, str] | None:
        """What a synchronous round's rule says now: (closed | failed, reason), or None to wait."""
        # Asked of SQL through the (round, state) indexes: while a task is pending and the deadline
        # is ahead, one EXISTS answers (the common case, once per delivered batch); only then count.
        past_deadline = round_.deadline is not None and self.clock() >= round_.deadline
        all_answered = not session.scalar(
            select(exists().where(Task.round_id == round_.id, Task.state == TASK_PENDING))
        )
        if not all_answered and not past_deadline:
            return None
        accepted = (
            session.scalar(
                select(func.count()).where(Delta.round_id == round_.id, Delta.status == DELTA_ACCEPTED)
            )
            or 0
        )
        if accepted >= round_.quorum and (all_answered or past_deadline):
            return ROUND_CLOSED, ""
        if past_deadline or (all_answered and accepted < round_.quorum):
            why = "deadline passed" if past_deadline else "every task answered"
            return ROUND_FAILED, f"{accepted} accepted deltas, quorum {round_.quorum}; {why}"
        return None

    def _cancel_pending_tasks(self, session: Session, round_ids: list[int]) -> None:
        """Tasks of a round that ended without them are answered as cancelled (late deltas are refused)."""
        self.running.discard(round_ids)  # these rounds are not aggregated
        if round_ids:
            session.execute(
                update(Task)
                .where(Task.round_id.in_(round_ids), Task.state == TASK_PENDING)
                .values(state=TASK_CANCELLED, done_at=self.clock())
            )

    def _advance_async(self, session: Session, run: Run, round_: Round) -> str | None:
        """Aggregate a full buffer; fail one that stays short past its deadline; keep workers busy."""
        accepted = (
            session.scalar(
                select(func.count()).where(Delta.round_id == round_.id, Delta.status == DELTA_ACCEPTED)
            )
            or 0
        )
        state: str | None = None
        if accepted >= round_.quorum:
            self._aggregate(session, round_)
            state = ROUND_CLOSED
        elif round_.deadline is not None and self.clock() >= round_.deadline:
            self._fail_round(
                session, round_, f"{accepted} of {round_.quorum} deltas when the deadline passed"
            )
            return ROUND_FAILED
        if run.state == RUN_RUNNING and self._refill_tasks(session, run):
            return state or ROUND_OPEN  # still open, but new tasks were written
        return state

    def _refill_tasks(self, session: Session, run: Run) -> int:
        """Give every worker of an async run without a pending task a task on the newest version;
        return how many tasks were issued."""
        current = session.scalar(
            select(Round)
            .where(Round.run_id == run.run_id, Round.state == ROUND_OPEN)
            .order_by(Round.number.desc())
        )
        if current is None:
            return 0
        run_rounds = select(Round.id).where(Round.run_id == run.run_id)
        worker_ids = set(session.scalars(select(Task.worker_id).where(Task.round_id.in_(run_rounds))))
        busy = set(
            session.scalars(
                select(Task.worker_id).where(Task.round_id.in_(run_rounds), Task.state == TASK_PENDING)
            )
        )
        model = session.get(Model, run.model_pk)
        base = session.get(ModelVersion, current.base_version_id)
        assert model is not None and base is not None
        issued = 0
        for worker_id in sorted(w for w in worker_ids - busy if w is not None):
            worker = session.get(Worker, worker_id)
            if worker is not None and worker.status == "active":
                self._issue_task(session, run, current, model, base, worker)
                issued += 1
        return issued

    def _fail_round(self, session: Session, round_: Round, reason: str) -> None:
        round_.state, round_.reason, round_.closed_at = ROUND_FAILED, reason, self.clock()
        self._cancel_pending_tasks(session, [round_.id])
        run = session.scalar(select(Run).where(Run.run_id == round_.run_id))
        if run is not None and run.state == RUN_RUNNING:
            run.state, run.reason, run.finished_at = (
                RUN_FAILED,
                f"round {round_.number}: {reason}",
                self.clock(),
            )
        logger.warning("round %d failed: %s", round_.id, reason)

    def _evaluate(
        self, session: Session, model: Model, weights: list[np.ndarray], path: str
    ) -> dict[str, Any]:
        """Held-out metrics of the new version; a failing evaluation is recorded, never fatal."""
        from common.model.bundle import ModelCode
        from coordinator.evaluation import evaluate, load_eval_data

        try:
            data = self._eval_cache.get(path)
            if data is None:
                data = self._eval_cache[path] = load_eval_data(path)
            return evaluate(ModelCode.from_bytes(model.code), weights, data)
        except Exception as exc:  # model code may raise anything; the round still closes
            logger.warning("evaluation of %s on %s failed: %s", model.name, path, exc)
            return _evaluation_failed(exc)

    def _aggregate(self, session: Session, round_: Round) -> None:
        run = session.scalar(select(Run).where(Run.run_id == round_.run_id))
        model = session.get(Model, round_.model_pk)
        assert run is not None and model is not None
        base_row = session.get(ModelVersion, round_.base_version_id)
        assert base_row is not None
        strategy = get_strategy(run.strategy, run.strategy_options)
        deltas = list(
            session.scalars(
                select(Delta)
                .where(Delta.round_id == round_.id, Delta.status == DELTA_ACCEPTED)
                .order_by(Delta.id)
            )
        )
        aggregation = self.running.take(round_.id, {d.id for d in deltas}, run.server_state_blob_id)
        if aggregation is None:  # not streamed (robust rules), or not every delta was: from SQL
            aggregation, _ = self._begin_aggregation(session, round_)
            for delta in deltas:
                assert delta.weights_blob_id is not None
                weights = codec.decode_weights(read_blob(session, delta.weights_blob_id))
                staleness = int((delta.metrics or {}).get("staleness", 0))
                aggregation.add(
                    weights, delta.sample_count * staleness_weight(staleness), staleness=staleness
                )
        samples = 0
        for delta in deltas:
            samples += delta.sample_count
            delta.status = DELTA_AGGREGATED
        new_weights = aggregation.finish()
        new_state = aggregation.server_state()
        if new_state is not None:  # FedAdam's moments etc.: carried to the next round, across restarts
            run.server_state_blob_id = write_blob(session, codec.layout_frame(new_state).parts).id
        metrics = _summarize_metrics(deltas)
        metrics.update(deltas=len(deltas), samples=samples)
        if run.eval_data:
            metrics.update(self._evaluate(session, model, new_weights, run.eval_data))
        version = self.registry.store_version_in(
            session,
            model,
            new_weights,
            parent=base_row,
            round_id=round_.id,
            strategy=strategy.name,
            strategy_config=strategy.config(),
            metrics=metrics,
        )
        round_.state, round_.result_version_id, round_.closed_at = ROUND_CLOSED, version.id, self.clock()
        session.add(release_outbox_row(model.name, version.version))
        run.rounds_done = round_.number
        logger.info(
            "round %d (run %s #%d): %d deltas -> %s v%d",
            round_.id,
            run.run_id,
            round_.number,
            len(deltas),
            model.name,
            version.version,
        )
        if run.state == RUN_RUNNING and round_.number < run.rounds_total:
            self._open_round(
                session, run, model, version, number=round_.number + 1, issue_tasks=run.mode == "sync"
            )
        elif run.state == RUN_RUNNING:
            run.state, run.finished_at = RUN_COMPLETED, self.clock()
            if run.mode == "async":  # workers still training for this run: their deltas come too late
                run_rounds = list(session.scalars(select(Round.id).where(Round.run_id == run.run_id)))
                self._cancel_pending_tasks(session, run_rounds)
        fault_point("coordinator-before-aggregation-commit")  # the transaction is not committed yet


def staleness_weight(staleness: int) -> float:
    """FedBuff's weight of a delta trained on a version ``staleness`` versions old: 1/sqrt(1 + s).

    A fresh delta weighs 1, one two versions behind 0.58, ten behind 0.30; deltas staler than the
    run's ``max_staleness`` are rejected before they are weighed.
    """
    return 1.0 / math.sqrt(1.0 + max(0, staleness))


def _evaluation_failed(exc: Exception) -> dict[str, Any]:
    return {"eval_error": f"{type(exc).__name__}: {exc}"[:500]}


def _summarize_metrics(deltas: Sequence[Delta]) -> dict[str, Any]:
    """Sample-weighted means of the numeric metrics the workers reported."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for delta in deltas:
        for key, value in (delta.metrics or {}).items():
            if isinstance(value, int | float) and math.isfinite(value):
                totals[key] = totals.get(key, 0.0) + float(value) * delta.sample_count
                weights[key] = weights.get(key, 0.0) + delta.sample_count
    return {f"workers_{k}": totals[k] / weights[k] for k in totals if weights[k] > 0}
