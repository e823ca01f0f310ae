"""The exactly-once audit every fault test ends with (coordinator/audit.py), on SQLite and PostgreSQL.

A real round history is made with the round engine in-process (three workers, a closed round
with its version, a second round with one delta pending, a run that failed by its rule); the audit
must pass it. Then each test breaks one promise the way a bug could, past the database's own
guards, and the audit must say so.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, text, update

from common import codec
from common.keyfiles import write_key_pair
from common.messages import DeltaReport, StartRun, TrainTask, decode
from common.model.bundle import split_model
from common.model.numpy_model import make_linear_model
from common.settings import Settings
from coordinator.audit import audit_rounds
from coordinator.db import Database, upgrade
from coordinator.db.blobs import write_blob
from coordinator.db.models import Delta, ModelVersion, OutboxMessage, Round, Task, Worker
from coordinator.registry import KeySigner, ModelRegistry
from coordinator.rounds import RoundEngine, utcnow

pytestmark = pytest.mark.integration
WORKERS = ("a", "b", "c")


@dataclass
class History:
    db: Database
    engine: RoundEngine
    registry: ModelRegistry
    now: dt.datetime

    def pending_task(self, run: str, worker: str) -> TrainTask:
        with self.db.session() as s:
            ids = set(
                s.scalars(
                    select(Task.task_id)
                    .join(Worker, Task.worker_id == Worker.id)
                    .join(Round, Task.round_id == Round.id)
                    .where(Worker.name == worker, Task.state == "pending", Round.run_id == run)
                )
            )
            bodies = [
                o.body
                for o in s.scalars(select(OutboxMessage).where(OutboxMessage.message_id.like("task-%")))
            ]
        (task,) = [t for b in bodies if (t := decode(b or b"", TrainTask)).task_id in ids]
        return task

    def deliver(self, run: str, worker: str, value: float, samples: int) -> None:
        task = self.pending_task(run, worker)
        base = self.registry.weights("m", task.version)
        report = DeltaReport(
            task_id=task.task_id,
            round_id=task.round_id,
            worker=worker,
            model="m",
            base_version=task.version,
            base_weights_sha256=task.weights_sha256,
            sample_count=samples,
            payload=codec.encode_weights([np.full_like(w, value) for w in base]),
        )
        assert self.engine.record_delta(report, worker).status == "accepted"

    def advance(self) -> None:
        for round_id in self.engine.open_round_ids():
            self.engine.advance(round_id)

    def tamper(self, *statements: object) -> None:
        """Run statements with the immutability trigger on versions dropped (as a bug past it could)."""
        drop = "DROP TRIGGER trg_model_versions_immutable"
        with self.db.session(write=True) as s:
            s.execute(text(drop + (" ON model_versions" if self.db.backend == "postgresql" else "")))
            for statement in statements:
                s.execute(statement)  # type: ignore[call-overload]


@pytest.fixture
def history(tmp_path: Path, database_url: str) -> Iterator[History]:
    settings = Settings(database_url=database_url, keys_dir=tmp_path / "keys")
    write_key_pair(settings.keys_dir)
    db = Database.from_settings(settings)
    upgrade(db)
    registry = ModelRegistry(db, KeySigner.from_settings(settings))
    registry.register("m", *split_model(make_linear_model(3, 2, model_id="m")))
    with db.session(write=True) as s:
        s.add_all([Worker(name=w, status="active") for w in WORKERS])
    h = History(db, RoundEngine(db, registry), registry, utcnow())
    h.engine.clock = lambda: h.now
    # run r1: round 1 closed with three deltas (v2), round 2 open with one delta pending
    h.engine.start_run(StartRun(run_id="r1", model="m", rounds=2, min_workers=2, deadline_s=3600.0))
    for worker, value, samples in (("a", 0.1, 10), ("b", -0.2, 30), ("c", 0.4, 5)):
        h.deliver("r1", worker, value, samples)
    h.advance()
    h.deliver("r1", "a", 0.3, 7)
    # run r2: quorum 3, one delta, then the deadline passes: the round and the run fail by their rule
    h.engine.start_run(StartRun(run_id="r2", model="m", rounds=1, min_workers=3, deadline_s=60.0))
    h.deliver("r2", "b", 0.5, 4)
    h.now += dt.timedelta(seconds=61)
    h.advance()
    try:
        yield h
    finally:
        db.dispose()


def closed_round(h: History) -> Round:
    with h.db.session() as s:
        (round_,) = s.scalars(select(Round).where(Round.state == "closed"))
        return round_


def test_a_sound_history_passes_with_its_pending_and_dropped_deltas(history: History) -> None:
    audit = audit_rounds(history.db)

    assert audit.ok, audit.problems
    assert (audit.closed_rounds, audit.versions, audit.accepted, audit.pending, audit.dropped) == (
        1,
        1,
        5,
        1,
        1,
    )
    assert audit.tasks == 9 and audit.unanswered == 4  # round 2 of r1: b, c; r2: a, c
    assert audit_rounds(history.db, ["r2"]).ok and audit_rounds(history.db, ["r2"]).versions == 0


def test_an_accepted_delta_left_in_a_closed_round_is_lost(history: History) -> None:
    round_ = closed_round(history)
    with history.db.session(write=True) as s:
        first = s.scalars(select(Delta).where(Delta.round_id == round_.id)).first()
        assert first is not None
        first.status = "accepted"

    audit = audit_rounds(history.db)

    assert audit.lost == 1 and "still accepted in closed round" in audit.problems[0]


def test_a_delta_marked_aggregated_in_an_open_round_is_lost(history: History) -> None:
    with history.db.session(write=True) as s:
        s.execute(update(Delta).where(Delta.status == "accepted").values(status="aggregated"))

    audit = audit_rounds(history.db)

    assert audit.lost == 2 and audit.pending == 0  # r1's round 2 (open) and r2's round (failed)


def test_a_version_counting_a_delta_twice_is_a_duplicate(history: History) -> None:
    round_ = closed_round(history)
    history.tamper(
        update(ModelVersion)
        .where(ModelVersion.id == round_.result_version_id)
        .values(metrics={"deltas": 4, "samples": 45})
    )

    audit = audit_rounds(history.db)

    assert audit.duplicated == 1 and audit.lost == 0


def test_a_round_aggregated_twice_shows_as_a_second_version(history: History) -> None:
    round_ = closed_round(history)
    with history.db.session(write=True) as s:
        v2 = s.get(ModelVersion, round_.result_version_id)
        assert v2 is not None
        fields = {c.name: getattr(v2, c.name) for c in ModelVersion.__table__.columns if c.name != "id"}
        s.add(ModelVersion(**{**fields, "version": 9}))

    audit = audit_rounds(history.db)

    assert audit.bad_versions == 1 and audit.versions == 2
    assert "made 2 versions" in audit.problems[0]


def test_a_half_written_version_is_found(history: History) -> None:
    round_ = closed_round(history)
    with history.db.session(write=True) as s:
        v2 = s.get(ModelVersion, round_.result_version_id)
        assert v2 is not None
        frame = codec.encode_weights([np.zeros((3, 2), np.float32)])  # the bias array never written
        blob = write_blob(s, frame)
    history.tamper(
        update(ModelVersion)
        .where(ModelVersion.id == round_.result_version_id)
        .values(weights_blob_id=blob.id, weights_sha256=blob.sha256)
    )

    audit = audit_rounds(history.db)

    assert audit.bad_versions == 1 and "half-written" in audit.problems[0]


def test_a_delta_weighed_three_times_makes_a_version_that_is_not_fedavg(history: History) -> None:
    round_ = closed_round(history)
    with history.db.session(write=True) as s:
        delta = s.scalars(select(Delta).where(Delta.round_id == round_.id)).first()
        assert delta is not None
        delta.sample_count *= 3

    audit = audit_rounds(history.db)

    assert audit.not_fedavg == 1 and not audit.ok


def test_a_done_task_whose_delta_vanished_is_lost(history: History) -> None:
    with history.db.session(write=True) as s:
        pending = s.scalars(select(Delta).where(Delta.status == "accepted", Delta.worker_name == "a")).one()
        s.delete(pending)

    audit = audit_rounds(history.db)

    assert audit.lost == 1 and "done without an accepted delta" in audit.problems[0]


def test_a_confirmed_delta_that_never_reached_sql_is_lost(history: History) -> None:
    with history.db.session() as s:
        recorded = set(s.scalars(select(Delta.task_id)))

    assert audit_rounds(history.db, confirmed=recorded).ok
    assert audit_rounds(history.db, confirmed=recorded | {uuid.uuid4().hex}).lost == 1
