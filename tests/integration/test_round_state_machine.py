"""A hypothesis state machine over the round engine on a real SQLite database (issue 6).

It interleaves deliveries, duplicate deliveries, garbage, crashes in the middle of an aggregation
(the transaction dies half-way), coordinator restarts (a fresh engine, caches gone) and deadline
ticks, and after every step checks the oracle (coordinator/audit.py): every accepted delta is in
exactly one aggregated version or still pending; none counts twice; each version counts its deltas;
one version per closed round; no version is half-written.

The crashes are in-process: an exception raised inside the transaction, after rows were written
(the new version's, a batch's deltas), rolls it back as the death of the process would; the
process-level kills (SIGKILL at named fault points) are in test_rounds_faults.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import select

from common import codec
from common.keyfiles import write_key_pair
from common.messages import DeltaReport, StartRun, TrainTask, decode
from common.model.bundle import split_model
from common.model.numpy_model import make_linear_model
from common.settings import Settings
from coordinator.audit import audit_rounds
from coordinator.db import Database, upgrade
from coordinator.db.models import ModelVersion, OutboxMessage, Round, Task, Worker
from coordinator.registry import KeySigner, ModelRegistry
from coordinator.rounds import RoundEngine, _Intake, utcnow

pytestmark = pytest.mark.integration
WORKERS = ("a", "b", "c")


class CrashError(Exception):
    """Stands for the coordinator dying in the middle of a transaction."""


class RoundMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="fedmq-sm-"))
        self.settings = Settings(
            database_url=f"sqlite:///{self.dir / 'db.sqlite'}", keys_dir=self.dir / "keys"
        )
        write_key_pair(self.settings.keys_dir)
        self.db = Database.from_settings(self.settings)
        upgrade(self.db)
        self.registry = ModelRegistry(self.db, KeySigner.from_settings(self.settings))
        code, weights = split_model(make_linear_model(3, 2, model_id="m"))
        self.registry.register("m", code, weights)
        with self.db.session(write=True) as s:
            s.add_all([Worker(name=w, status="active") for w in WORKERS])
        self.now = utcnow()
        self.engine = self._engine()
        self.runs = 0
        self.sent: dict[str, bytes] = {}

    def _engine(self) -> RoundEngine:
        return RoundEngine(self.db, self.registry, clock=lambda: self.now)

    def teardown(self) -> None:
        self.db.dispose()

    def _pending(self, worker: str) -> TrainTask | None:
        with self.db.session() as s:
            ids = set(
                s.scalars(
                    select(Task.task_id)
                    .join(Worker, Task.worker_id == Worker.id)
                    .where(Worker.name == worker, Task.state == "pending")
                )
            )
            bodies = [
                o.body
                for o in s.scalars(select(OutboxMessage).where(OutboxMessage.message_id.like("task-%")))
            ]
        for body in bodies:
            task = decode(body or b"", TrainTask)
            if task.task_id in ids:
                return task
        return None

    @precondition(lambda self: self.runs < 3)
    @rule(rounds=st.integers(1, 3))
    def start_run(self, rounds: int) -> None:
        self.runs += 1
        self.engine.start_run(
            StartRun(run_id=f"r{self.runs}", model="m", rounds=rounds, min_workers=2, deadline_s=60.0)
        )

    def _report(self, task: TrainTask, worker: str, value: float) -> DeltaReport:
        base = self.registry.weights("m", task.version)
        return DeltaReport(
            task_id=task.task_id,
            round_id=task.round_id,
            worker=worker,
            model="m",
            base_version=task.version,
            base_weights_sha256=task.weights_sha256,
            sample_count=5,
            payload=codec.encode_weights([np.full_like(w, value) for w in base]),
        )

    def _round_open(self, round_id: int) -> bool:
        with self.db.session() as s:
            return s.scalar(select(Round.state).where(Round.id == round_id)) == "open"

    @rule(worker=st.sampled_from(WORKERS), value=st.floats(-1, 1), twice=st.booleans())
    def deliver(self, worker: str, value: float, twice: bool) -> None:
        task = self._pending(worker)
        if task is None:
            return
        report = self._report(task, worker, value)
        round_open = self._round_open(task.round_id)
        first = self.engine.record_delta(report, worker)
        assert first.status == ("accepted" if round_open else "rejected"), first
        if twice:
            assert self.engine.record_delta(report, worker).status == "duplicate"

    @rule(
        workers=st.lists(st.sampled_from(WORKERS), min_size=1, max_size=6),
        garbage=st.booleans(),
        crash=st.booleans(),
    )
    def deliver_batch(self, workers: list[str], garbage: bool, crash: bool) -> None:
        """What the consumer had in hand at once, in one transaction: repeats of a worker are
        duplicate deliveries; optionally a garbage copy, and a transaction that dies at its end."""
        tasks = {w: t for w in dict.fromkeys(workers) if (t := self._pending(w)) is not None}
        items = [(self._report(tasks[w], w, 0.5), w) for w in workers if w in tasks]
        if not items:
            return
        if garbage:
            report, worker = items[0]
            items.append((dataclasses.replace(report, payload=b"junk"), worker))
        open_before = {t.task_id: self._round_open(t.round_id) for t in tasks.values()}
        if crash:
            original = _Intake.store

            def die(intake: _Intake, done_at: Any) -> None:
                original(intake, done_at)  # everything written, then the process dies before the commit
                raise CrashError

            with mock.patch.object(_Intake, "store", die), pytest.raises(CrashError):
                self.engine.record_deltas(items)
            assert all(self._pending(w) is not None for w in tasks), "a crashed batch left a trace"
            self.engine = self._engine()
            return
        outcomes = self.engine.record_deltas(items)
        seen: set[str] = set()
        for (report, _), outcome in zip(items, outcomes, strict=True):
            if report.task_id in seen:
                assert outcome.status == "duplicate", outcome
            else:
                assert outcome.status == ("accepted" if open_before[report.task_id] else "rejected"), outcome
            seen.add(report.task_id)
        # The consumer leaves a round its deltas said waits to the ticker: advancing it must change nothing.
        for round_id in {o.round_id for o in outcomes if o.round_waits and o.round_id is not None}:
            assert self.engine.advance(round_id) is None, f"round {round_id} was said to wait"

    @rule(worker=st.sampled_from(WORKERS), junk=st.binary(max_size=64))
    def deliver_garbage(self, worker: str, junk: bytes) -> None:
        task = self._pending(worker)
        if task is None:
            return
        report = DeltaReport(
            task_id=task.task_id,
            round_id=task.round_id,
            worker=worker,
            model="m",
            base_version=task.version,
            base_weights_sha256=task.weights_sha256,
            sample_count=5,
            payload=junk,
        )
        assert self.engine.record_delta(report, worker).status == "rejected"

    @rule()
    def crash_while_aggregating(self) -> None:
        original = self.registry.store_version_in

        def die(*args: object, **kwargs: object) -> ModelVersion:
            original(*args, **kwargs)  # the version row is written, then the process dies
            raise CrashError

        self.registry.store_version_in = die  # type: ignore[method-assign]
        try:
            for round_id in self.engine.open_round_ids():
                try:
                    self.engine.advance(round_id)
                except CrashError:
                    pass
        finally:
            self.registry.store_version_in = original  # type: ignore[method-assign]
        self.engine = self._engine()  # the restarted coordinator

    @rule()
    def restart(self) -> None:
        self.engine = self._engine()

    @rule(seconds=st.sampled_from([1, 61]))
    def tick(self, seconds: int) -> None:
        self.now += dt.timedelta(seconds=seconds)
        for round_id in self.engine.open_round_ids():
            self.engine.advance(round_id)

    @invariant()
    def every_delta_counts_once(self) -> None:
        audit = audit_rounds(self.db)  # the oracle every fault test ends with (coordinator/audit.py)
        assert audit.ok, "\n".join(audit.problems)


TestRoundMachine = RoundMachine.TestCase
TestRoundMachine.settings = settings(max_examples=20, stateful_step_count=20, deadline=None)
