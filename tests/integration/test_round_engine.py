"""The round engine in process on a real database (no broker): strategy state and client options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from common import codec
from common.keyfiles import write_key_pair
from common.messages import DeltaReport, StartRun, TrainTask, decode
from common.model.bundle import split_model
from common.model.numpy_model import make_linear_model
from common.settings import Settings
from coordinator.cli.main import app
from coordinator.db import Database, upgrade
from coordinator.db.models import Delta, ModelVersion, OutboxMessage, Run, Task, Worker
from coordinator.registry import KeySigner, ModelRegistry
from coordinator.rounds import RoundEngine
from coordinator.strategies import get_strategy

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(tmp_path: Path, database_url: str):
    settings = Settings(database_url=database_url, keys_dir=tmp_path / "keys")
    write_key_pair(settings.keys_dir)
    db = Database.from_settings(settings)
    upgrade(db)
    registry = ModelRegistry(db, KeySigner.from_settings(settings))
    code, weights = split_model(make_linear_model(4, 3, model_id="m"))
    registry.register("m", code, weights)
    with db.session(write=True) as s:
        s.add_all([Worker(name="a", status="active"), Worker(name="b", status="active")])
    yield RoundEngine(db, registry), registry
    db.dispose()


def pending_tasks(engine: RoundEngine) -> list[TrainTask]:
    with engine.db.session() as s:
        pending = {t.task_id for t in s.scalars(select(Task).where(Task.state == "pending"))}
        bodies = [
            o.body for o in s.scalars(select(OutboxMessage).where(OutboxMessage.message_id.like("task-%")))
        ]
    tasks = [decode(b, TrainTask) for b in bodies if b]
    return [t for t in tasks if t.task_id in pending]


def delta_report(registry: ModelRegistry, task: TrainTask, worker: str, delta_value: float) -> DeltaReport:
    """``worker``'s answer to ``task``: 10 samples, ``delta_value`` in every coordinate."""
    base = registry.weights("m", task.version)
    return DeltaReport(
        task_id=task.task_id,
        round_id=task.round_id,
        worker=worker,
        model="m",
        base_version=task.version,
        base_weights_sha256=task.weights_sha256,
        sample_count=10,
        payload=codec.encode_weights([np.full_like(w, delta_value) for w in base]),
    )


def answer(
    engine: RoundEngine, registry: ModelRegistry, task: TrainTask, worker: str, delta_value: float
) -> None:
    """Record the delta and advance its round, as the coordinator does after each batch of results."""
    report = delta_report(registry, task, worker, delta_value)
    assert engine.record_delta(report, worker).status == "accepted"
    engine.advance(task.round_id)


def pending_task_of(engine: RoundEngine, worker: str) -> TrainTask:
    with engine.db.session() as s:
        mine = set(
            s.scalars(
                select(Task.task_id)
                .join(Worker, Task.worker_id == Worker.id)
                .where(Worker.name == worker, Task.state == "pending")
            )
        )
    (task,) = [t for t in pending_tasks(engine) if t.task_id in mine]
    return task


def test_fedadam_state_is_carried_from_round_to_round_in_sql(engine):
    # Prepare
    engine, registry = engine
    options = {"eta": 0.1, "tau": 0.01}
    engine.start_run(
        StartRun(
            run_id="r",
            model="m",
            rounds=2,
            min_workers=2,
            deadline_s=60.0,
            strategy="fedadam",
            options=options,
        )
    )

    # Execute: two rounds, every delta 0.5 everywhere.
    for _ in range(2):
        tasks = pending_tasks(engine)
        assert len(tasks) == 2
        for task in tasks:
            with engine.db.session() as s:
                worker = s.get(
                    Worker, s.scalar(select(Task.worker_id).where(Task.task_id == task.task_id))
                ).name
            answer(engine, registry, task, worker, 0.5)

    # Assert: the stored version 3 equals one uninterrupted FedAdam over the same two rounds.
    strategy = get_strategy("fedadam", options)
    weights, state = [np.array(w) for w in registry.weights("m", 1)], None
    for _ in range(2):
        agg = strategy.begin(weights, state)
        for _ in range(2):
            agg.add([np.full_like(w, 0.5) for w in weights], 10)
        weights, state = agg.finish(), agg.server_state()
    stored = registry.weights("m", 3)
    for got, want in zip(stored, weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    with engine.db.session() as s:
        assert s.scalar(select(Run.server_state_blob_id)) is not None


def test_fedprox_sends_its_proximal_term_to_the_workers(engine):
    engine, _ = engine
    engine.start_run(
        StartRun(
            run_id="p",
            model="m",
            rounds=1,
            min_workers=2,
            deadline_s=60.0,
            strategy="fedprox",
            options={"mu": 0.05},
            train={"epochs": 2},
        )
    )
    tasks = pending_tasks(engine)
    assert tasks and all(t.train == {"epochs": 2, "proximal_mu": 0.05} for t in tasks)


def test_a_runs_norm_bound_and_sample_cap_reject_deltas_with_their_reason(engine):
    engine, registry = engine
    engine.start_run(
        StartRun(run_id="b", model="m", rounds=1, min_workers=2, deadline_s=60.0, max_norm=1.0, max_samples=8)
    )
    tasks = pending_tasks(engine)
    base = registry.weights("m", 1)
    outcomes = []
    for task, (value, samples) in zip(tasks, [(0.5, 5), (0.01, 9)], strict=True):
        with engine.db.session() as s:
            worker = s.get(Worker, s.scalar(select(Task.worker_id).where(Task.task_id == task.task_id))).name
        report = DeltaReport(
            task_id=task.task_id,
            round_id=task.round_id,
            worker=worker,
            model="m",
            base_version=1,
            base_weights_sha256=task.weights_sha256,
            sample_count=samples,
            payload=codec.encode_weights([np.full_like(w, value) for w in base]),
        )
        outcomes.append(engine.record_delta(report, worker))

    assert [o.status for o in outcomes] == ["rejected", "rejected"]
    assert "L2 norm" in outcomes[0].reason and "exceeds the bound 1" in outcomes[0].reason
    assert "sample count 9 exceeds the cap of 8" in outcomes[1].reason


def test_async_deltas_committed_together_fill_one_buffer_at_a_time(engine):
    # Prepare: five workers train continuously for an async run with buffers of two deltas.
    engine, registry = engine
    with engine.db.session(write=True) as s:
        s.add_all([Worker(name=n, status="active") for n in ("c", "d", "e")])
    engine.start_run(
        StartRun(
            run_id="a", model="m", rounds=3, min_workers=2, deadline_s=60.0, mode="async", max_staleness=5
        )
    )
    tasks = pending_tasks(engine)
    assert len(tasks) == 5
    with engine.db.session() as s:
        owner = {
            t.task_id: s.scalar(
                select(Worker.name).join(Task, Task.worker_id == Worker.id).where(Task.task_id == t.task_id)
            )
            for t in tasks
        }
    base = registry.weights("m", 1)
    items = [
        (
            DeltaReport(
                task_id=t.task_id,
                round_id=t.round_id,
                worker=owner[t.task_id],
                model="m",
                base_version=1,
                base_weights_sha256=t.weights_sha256,
                sample_count=10,
                payload=codec.encode_weights([np.full_like(w, 0.1) for w in base]),
            ),
            owner[t.task_id],
        )
        for t in tasks
    ]

    # Execute: all five deltas arrive in one batch (one group commit), as the consumer hands them over.
    outcomes = engine.record_deltas(items)

    # Verify: as if they had come one at a time: two per buffer, versions 2 and 3 aggregated, the
    # fifth waiting in the third buffer with staleness 2 (its task trained version 1).
    assert [o.status for o in outcomes] == ["accepted"] * 5
    with engine.db.session() as s:
        versions = {v.version: v for v in s.scalars(select(ModelVersion))}
        assert sorted(versions) == [1, 2, 3]
        assert versions[2].metrics["deltas"] == 2 and versions[3].metrics["deltas"] == 2
        waiting = list(s.scalars(select(Delta).where(Delta.status == "accepted")))
    assert len(waiting) == 1 and waiting[0].metrics["staleness"] == 2


def test_async_deltas_weigh_their_sample_count_by_one_over_sqrt_of_one_plus_their_staleness(engine):
    # Prepare: three workers on an async run aggregating every 2 deltas; a and b answer first, so
    # version 2 is made while c still trains version 1.
    engine, registry = engine
    with engine.db.session(write=True) as s:
        s.add(Worker(name="c", status="active"))
    engine.start_run(
        StartRun(
            run_id="w", model="m", rounds=2, min_workers=2, deadline_s=60.0, mode="async", max_staleness=5
        )
    )
    answer(engine, registry, pending_task_of(engine, "a"), "a", 0.2)
    answer(engine, registry, pending_task_of(engine, "b"), "b", 0.2)
    stale, fresh = pending_task_of(engine, "c"), pending_task_of(engine, "b")
    assert (stale.version, fresh.version) == (1, 2)

    # Execute: c's delta (1.0, trained on version 1: staleness 1) and b's (0.0, on version 2) fill
    # the second buffer, 10 samples each.
    answer(engine, registry, stale, "c", 1.0)
    answer(engine, registry, fresh, "b", 0.0)

    # Assert: version 3 = version 2 + (10/sqrt(2) * 1.0 + 10 * 0.0) / (10/sqrt(2) + 10) = 1/(1 + sqrt 2),
    # where equal weights would have given 0.5.
    expected_step = 1.0 / (1.0 + np.sqrt(2.0))
    for v3, v2 in zip(registry.weights("m", 3), registry.weights("m", 2), strict=True):
        np.testing.assert_allclose(v3 - v2, expected_step, atol=1e-6)
    with engine.db.session() as s:
        v3_row = s.scalar(select(ModelVersion).where(ModelVersion.version == 3))
        staleness = sorted(
            d.metrics["staleness"] for d in s.scalars(select(Delta).where(Delta.round_id == v3_row.round_id))
        )
        assert s.scalar(select(Run.state).where(Run.run_id == "w")) == "completed"
    assert staleness == [0, 1]


def test_an_async_delta_staler_than_max_staleness_is_rejected_and_rounds_show_says_why(
    engine, database_url: str
):
    # Prepare: buffers of one delta, no staleness allowed; a's delta makes version 2 while b trains version 1.
    engine, registry = engine
    engine.start_run(
        StartRun(
            run_id="s", model="m", rounds=3, min_workers=1, deadline_s=60.0, mode="async", max_staleness=0
        )
    )
    late = pending_task_of(engine, "b")
    answer(engine, registry, pending_task_of(engine, "a"), "a", 0.1)

    # Execute
    outcome = engine.record_delta(delta_report(registry, late, "b", 0.1), "b")
    shown = CliRunner().invoke(
        app, ["rounds", "show", "s"], env={"FEDMQ_DATABASE_URL": database_url, "COLUMNS": "250"}
    )

    # Assert: rejected, not aggregated into anything, and the reason is in the run's table.
    assert outcome.status == "rejected"
    assert outcome.reason == "staleness 1 exceeds the run's maximum of 0"
    assert shown.exit_code == 0, shown.output
    assert "b: staleness 1 exceeds the run's maximum of 0" in shown.output
    assert [v.version for v in registry.versions("m")] == [1, 2]


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "median"])
def test_a_round_closes_on_the_running_aggregation_or_from_sql_with_the_same_version(
    engine, monkeypatch, strategy
):
    """FedAvg-family rounds are aggregated as their deltas commit, so closing reads no delta back;
    a fresh engine (a restarted coordinator) and the robust rules aggregate from SQL. All agree."""
    import coordinator.rounds as rounds_module

    engine, registry = engine
    delta_reads: list[int] = []
    original_read = rounds_module.read_blob

    def counting_read(session, blob_id):
        delta_reads.append(blob_id)
        return original_read(session, blob_id)

    monkeypatch.setattr(rounds_module, "read_blob", counting_read)
    results: dict[str, list[np.ndarray]] = {}
    for label, restart in (("live", False), ("restarted", True)):
        run_id = f"{label}-{strategy}"
        engine.start_run(
            StartRun(run_id=run_id, model="m", rounds=1, min_workers=2, deadline_s=60.0, strategy=strategy)
        )
        tasks = [t for t in pending_tasks(engine)]
        first, second = sorted(tasks, key=lambda t: t.task_id)
        worker_of = {
            t.task_id: w
            for t, w in ((pending_task_of(engine, "a"), "a"), (pending_task_of(engine, "b"), "b"))
        }
        engine.record_delta(
            delta_report(registry, first, worker_of[first.task_id], 0.25), worker_of[first.task_id]
        )
        if restart:  # a new coordinator process: nothing in memory but SQL
            engine = RoundEngine(engine.db, registry)
        engine.record_delta(
            delta_report(registry, second, worker_of[second.task_id], 1.0), worker_of[second.task_id]
        )
        delta_reads.clear()
        assert engine.advance(first.round_id) == "closed"
        streamed = strategy != "median" and not restart
        with engine.db.session() as s:
            run = s.scalar(select(Run).where(Run.run_id == run_id))
            latest = s.scalar(select(ModelVersion).order_by(ModelVersion.id.desc()))
            accepted = list(s.scalars(select(Delta.weights_blob_id).where(Delta.round_id == first.round_id)))
        assert run.state == "completed" and latest.metrics["deltas"] == 2
        assert (set(delta_reads) & set(accepted)) == (set() if streamed else set(accepted))
        # Each run starts from the version the one before made: compare the steps they took.
        new, base = registry.weights("m", latest.version), registry.weights("m", latest.version - 1)
        results[label] = [n - b for n, b in zip(new, base, strict=True)]

    for live, restarted in zip(results["live"], results["restarted"], strict=True):
        np.testing.assert_allclose(live, restarted, rtol=1e-6, atol=1e-7)  # float32 steps off other bases
