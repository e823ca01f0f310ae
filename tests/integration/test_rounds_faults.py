"""Rounds under faults and bad deltas, on a real RabbitMQ with real processes (issue 4's "done when").

The oracle every test checks: each task has at most one delta row; every accepted delta is in
exactly one aggregated version; rejected deltas carry their reason and are visible in
``fedmq rounds show``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pika
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from common import codec
from common.messages import DeltaReport
from common.model.numpy_model import make_linear_model
from coordinator.cli.main import app
from coordinator.db.models import Delta, Round, Task, Worker
from coordinator.registry import KeySigner, ModelRegistry
from tests.integration.cluster import Cluster
from worker.config import load_worker_config

pytestmark = pytest.mark.integration


def gaussian_parts(
    n_workers: int, per_worker: int, n_features: int = 4, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    centers = np.eye(3, n_features, dtype=np.float32) * 2
    parts = []
    for _ in range(n_workers):
        y = rng.integers(0, 3, per_worker)
        parts.append(
            {"x": (centers[y] + rng.normal(0, 0.7, (per_worker, n_features))).astype(np.float32), "y": y}
        )
    return parts


def check_oracle(cluster: Cluster) -> None:
    """Every task has at most one delta; no delta is aggregated into two versions."""
    with cluster.database() as db, db.session() as s:
        per_task = s.execute(
            select(Delta.task_id, func.count()).where(Delta.task_id.is_not(None)).group_by(Delta.task_id)
        ).all()
        assert all(count == 1 for _, count in per_task)
        for round_ in s.scalars(select(Round).where(Round.state == "closed")):
            assert (
                s.scalar(select(func.count()).where(Delta.round_id == round_.id, Delta.status == "accepted"))
                == 0
            )


def publish_as(cluster: Cluster, worker: str, report: DeltaReport) -> None:
    """Publish a delta report with a worker's own credentials, as its daemon would."""
    config = load_worker_config(cluster.root / "workers" / f"{worker}.toml")
    connection = pika.BlockingConnection(pika.URLParameters(config.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            "fedmq.results",
            "results",
            report.encode(),
            pika.BasicProperties(
                user_id=worker, delivery_mode=2, message_id=f"{worker}-{time.monotonic_ns()}"
            ),
            mandatory=True,
        )
    finally:
        connection.close()


def tasks_by_worker(cluster: Cluster) -> dict[str, Task]:
    with cluster.database() as db, db.session() as s:
        rows = s.execute(select(Worker.name, Task).join(Task, Task.worker_id == Worker.id)).all()
        return {name: task for name, task in rows}


def test_bad_and_duplicate_deltas_are_recorded_with_reasons_and_counted_once(cluster: Cluster):
    # Prepare: four workers whose daemons are not running; the test speaks for them.
    cluster.register("m", make_linear_model(4, 3, model_id="m"))
    for i, part in enumerate(gaussian_parts(4, 50)):
        cluster.add_worker(f"w{i}", part)
    cluster.start_coordinator()
    run_id = cluster.start_run("m", rounds=1, min_workers=2, deadline_s=120.0)
    cluster.wait_for("tasks", lambda: len(tasks_by_worker(cluster)) == 4)
    tasks = tasks_by_worker(cluster)
    with cluster.database() as db:
        registry = ModelRegistry(db, KeySigner.from_settings(cluster.settings))
        base = registry.weights("m", 1)
        sha = registry.version("m", 1).weights_sha256

    def report(
        worker: str, task_worker: str, delta: list[np.ndarray], version: int = 1, samples: int = 50
    ) -> DeltaReport:
        task = tasks[task_worker]
        return DeltaReport(
            task_id=task.task_id,
            round_id=task.round_id,
            worker=task_worker,
            model="m",
            base_version=version,
            base_weights_sha256=sha,
            sample_count=samples,
            payload=codec.encode_weights(delta),
        )

    small = [np.full_like(w, 0.01) for w in base]
    nan = [np.full_like(w, np.nan) for w in base]

    # Execute
    publish_as(cluster, "w0", report("w0", "w0", nan))  # NaN
    publish_as(cluster, "w0", report("w0", "w1", small))  # w0 pretends to be w1
    publish_as(cluster, "w3", report("w3", "w3", small, version=7))  # wrong base version
    publish_as(cluster, "w2", report("w2", "w2", small, samples=30))
    publish_as(cluster, "w2", report("w2", "w2", small, samples=30))  # the same delta again
    publish_as(cluster, "w1", report("w1", "w1", small, samples=20))
    view = cluster.wait_run(run_id, timeout_s=120)

    # Assert
    assert view.state == "completed"
    (round_,) = view.rounds
    assert round_.result_version == 2 and round_.metrics["deltas"] == 2 and round_.metrics["samples"] == 50
    reasons = {d.worker: d.reason for d in round_.deltas if d.status == "rejected"}
    assert "holds NaN" in reasons["w0"]
    assert "sent by broker user 'w0', not by worker 'w1'" in reasons["w1 (sent by w0)"]
    assert "delta against version 7" in reasons["w3"]
    assert sorted(d.worker for d in round_.deltas if d.status == "aggregated") == ["w1", "w2"]
    with cluster.database() as db:
        new = ModelRegistry(db, KeySigner.from_settings(cluster.settings)).weights("m", 2)
    np.testing.assert_allclose(new[0], base[0] + 0.01, rtol=1e-6)  # (30*0.01 + 20*0.01) / 50
    shown = CliRunner().invoke(app, ["rounds", "show", run_id, "--json"], env=cluster.env())
    assert shown.exit_code == 0, shown.output
    shown_reasons = [d["reason"] for d in json.loads(shown.output)["rounds"][0]["deltas"] if d["reason"]]
    assert len(shown_reasons) == 3 and any("holds NaN" in r for r in shown_reasons)
    check_oracle(cluster)


def test_worker_killed_mid_training_gets_its_task_back_on_restart(sqlite_cluster: Cluster):
    cluster = sqlite_cluster
    # Prepare: training long enough (thousands of SGD steps) to be killed in the middle of it.
    cluster.register("m", make_linear_model(4, 3, model_id="m"))
    for i, part in enumerate(gaussian_parts(3, 4000)):
        cluster.add_worker(f"w{i}", part)
    cluster.start_coordinator()
    for i in range(3):
        cluster.start_worker(f"w{i}")
    run_id = cluster.start_run("m", rounds=2, min_workers=3, train={"epochs": 300, "batch_size": 8})

    # Execute: SIGKILL w0 while it trains the first round's task, then start it again.
    cluster.wait_for("w0 to start training", lambda: "training m v1" in cluster.log("w0"), timeout_s=120)
    cluster.kill("w0")
    assert "delta against m v1 sent" not in cluster.log("w0")
    cluster.start_worker("w0")
    view = cluster.wait_run(run_id, timeout_s=300)

    # Assert: both rounds complete with exactly one delta per worker.
    assert view.state == "completed"
    for r in view.rounds:
        assert sorted(d.worker for d in r.deltas) == ["w0", "w1", "w2"]
        assert all(d.status == "aggregated" for d in r.deltas)
    check_oracle(cluster)


def test_coordinator_killed_mid_round_continues_with_the_accepted_deltas(cluster: Cluster):
    # Prepare: w2 has ten times the data of the others, so the round is half done for a while.
    cluster.register("m", make_linear_model(4, 3, model_id="m"))
    parts = gaussian_parts(3, 400)
    parts[2] = gaussian_parts(1, 4000, seed=5)[0]
    for i, part in enumerate(parts):
        cluster.add_worker(f"w{i}", part)
    cluster.start_coordinator()
    for i in range(3):
        cluster.start_worker(f"w{i}")
    run_id = cluster.start_run("m", rounds=1, min_workers=3, train={"epochs": 60, "batch_size": 8})

    def accepted_ids() -> list[int]:
        with cluster.database() as db, db.session() as s:
            return list(s.scalars(select(Delta.id).where(Delta.status == "accepted").order_by(Delta.id)))

    # Execute: SIGKILL the coordinator once some deltas are committed, restart it later.
    cluster.wait_for("a first accepted delta", lambda: len(accepted_ids()) >= 1, timeout_s=120)
    before = accepted_ids()
    cluster.kill("coordinator")
    assert (view := cluster.run(run_id)) is not None and view.state == "running"
    cluster.wait_for(
        "w2 to send its delta", lambda: "delta against m v1 sent" in cluster.log("w2"), timeout_s=120
    )
    cluster.start_coordinator()
    view = cluster.wait_run(run_id, timeout_s=120)

    # Assert: the deltas accepted before the crash are the ones aggregated, with w2's; none twice.
    assert view.state == "completed"
    (round_,) = view.rounds
    assert sorted(d.worker for d in round_.deltas) == ["w0", "w1", "w2"]
    assert round_.metrics["deltas"] == 3
    with cluster.database() as db, db.session() as s:
        statuses = dict(s.execute(select(Delta.id, Delta.status)).all())
    assert all(statuses[i] == "aggregated" for i in before)
    check_oracle(cluster)


def test_a_model_larger_than_the_chunk_size_completes_a_round(sqlite_cluster: Cluster):
    # Prepare: a 40 MB model (100,000 x 100 float32) with 4 MB chunks (the transport path: SQLite only).
    cluster = sqlite_cluster
    cluster.register("big", make_linear_model(100_000, 100, model_id="big"))
    rng = np.random.default_rng(0)
    for i in range(2):
        cluster.add_worker(
            f"w{i}", {"x": rng.random((16, 100_000), dtype=np.float32), "y": rng.integers(0, 100, 16)}
        )
    cluster.start_coordinator()
    for i in range(2):
        cluster.start_worker(f"w{i}")

    # Execute
    run_id = cluster.start_run("big", rounds=1, min_workers=2, train={"batch_size": 16})
    view = cluster.wait_run(run_id, timeout_s=300)

    # Assert
    assert view.state == "completed" and view.rounds[0].result_version == 2
    with cluster.database() as db:
        info = ModelRegistry(db, KeySigner.from_settings(cluster.settings)).version("big", 2)
    assert info.weights_size > 40_000_000 > cluster.settings.chunk_size * 9
    check_oracle(cluster)


def test_async_run_is_not_blocked_by_a_slow_worker_while_sync_waits_for_it(sqlite_cluster: Cluster):
    # Prepare: w2 holds ten times the data of w0 and w1, so each of its tasks takes ten times longer.
    cluster = sqlite_cluster
    cluster.register("m", make_linear_model(4, 3, model_id="m"))
    parts = gaussian_parts(2, 300) + gaussian_parts(1, 3000, seed=9)
    for i, part in enumerate(parts):
        cluster.add_worker(f"w{i}", part)
    cluster.start_coordinator()
    for i in range(3):
        cluster.start_worker(f"w{i}")
    train = {"epochs": 100, "batch_size": 8}

    # Execute: an async run producing 4 versions from buffers of 2 deltas ...
    async_id = cluster.start_run("m", rounds=4, min_workers=2, mode="async", max_staleness=3, train=train)
    async_view = cluster.wait_run(async_id, timeout_s=300)
    # ... then a sync round that needs all three workers.
    sync_id = cluster.start_run("m", rounds=1, min_workers=3, train=train)
    cluster.wait_for(
        "the fast workers' sync deltas",
        lambda: (v := cluster.run(sync_id)) is not None and bool(v.rounds) and v.rounds[0].accepted >= 2,
        timeout_s=120,
    )
    sync_open = cluster.run(sync_id)
    sync_view = cluster.wait_run(sync_id, timeout_s=300)

    # Assert: the async run made its 4 versions mostly from the fast workers' deltas (staleness
    # recorded), while the sync round stayed open until the slow worker answered.
    assert async_view.state == "completed"
    assert [r.result_version for r in async_view.rounds] == [2, 3, 4, 5]
    aggregated = [d for r in async_view.rounds for d in r.deltas if d.status == "aggregated"]
    assert len(aggregated) == 8
    assert sum(1 for d in aggregated if d.worker == "w2") <= 2
    assert sync_open is not None and sync_open.state == "running" and sync_open.rounds[0].state == "open"
    assert sync_view.state == "completed" and sync_view.rounds[0].accepted == 3
    check_oracle(cluster)


def test_a_task_that_crashes_the_worker_every_time_is_dead_lettered_and_the_round_goes_on(
    sqlite_cluster: Cluster,
):
    # Prepare: w2's labels are outside the model's 3 classes, so its training raises every time.
    cluster = sqlite_cluster
    cluster.register("m", make_linear_model(4, 3, model_id="m"))
    parts = gaussian_parts(3, 100)
    parts[2]["y"] = parts[2]["y"] + 50
    for i, part in enumerate(parts):
        cluster.add_worker(f"w{i}", part)
    cluster.start_coordinator()
    for i in range(3):
        cluster.start_worker(f"w{i}")

    cluster.wait_workers_seen(["w0", "w1", "w2"])

    # Execute
    run_id = cluster.start_run("m", rounds=1, min_workers=2, deadline_s=300.0)
    view = cluster.wait_run(run_id, timeout_s=240)

    # Assert: the round closed with the two good deltas long before its deadline, w2's task is
    # answered as failed, and the poison task sits in w2's dead-letter queue with its reason.
    assert view.state == "completed"
    (round_,) = view.rounds
    assert sorted(d.worker for d in round_.deltas) == ["w0", "w1"] and round_.answered == 3
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(cluster.settings.amqp_url))
    try:
        method, properties, _ = connection.channel().basic_get("fedmq.tasks.w2.dlq", auto_ack=True)
    finally:
        connection.close()
    assert method is not None, "the poison task is not in the dead-letter queue"
    reason = (properties.headers or {}).get("x-fedmq-reason", "")
    assert "IndexError" in reason or "index" in reason.lower(), properties.headers
    check_oracle(cluster)


def test_worker_killed_after_publishing_before_acking_counts_once(sqlite_cluster: Cluster):
    # Prepare: w0 dies (SIGKILL) right after the broker confirmed its delta, before acking its task.
    cluster = sqlite_cluster
    cluster.register("m", make_linear_model(4, 3, model_id="m"))
    for i, part in enumerate(gaussian_parts(2, 200)):
        cluster.add_worker(f"w{i}", part)
    cluster.start_coordinator()
    cluster.start_worker("w0", kill_at="worker-after-delta-publish")
    cluster.start_worker("w1")
    run_id = cluster.start_run("m", rounds=2, min_workers=2)

    # Execute
    assert cluster.wait_exit("w0") == -9
    cluster.start_worker("w0")
    view = cluster.wait_run(run_id)

    # Assert: the task came back and was trained again; its second delta was a duplicate.
    assert view.state == "completed"
    for r in view.rounds:
        assert sorted(d.worker for d in r.deltas) == ["w0", "w1"]
    assert "duplicate" in cluster.log("coordinator")
    check_oracle(cluster)


@pytest.mark.parametrize("point", ["coordinator-after-delta-commit", "coordinator-after-aggregation-commit"])
def test_coordinator_killed_at_a_commit_before_acking_or_publishing(sqlite_cluster: Cluster, point: str):
    # Prepare
    cluster = sqlite_cluster
    cluster.register("m", make_linear_model(4, 3, model_id="m"))
    for i, part in enumerate(gaussian_parts(2, 200)):
        cluster.add_worker(f"w{i}", part)
    cluster.start_coordinator(kill_at=point)
    for i in range(2):
        cluster.start_worker(f"w{i}")
    run_id = cluster.start_run("m", rounds=2, min_workers=2)

    # Execute: the coordinator dies at the point; a new one takes over the same database and queues.
    assert cluster.wait_exit("coordinator") == -9
    cluster.start_coordinator()
    view = cluster.wait_run(run_id)

    # Assert: both rounds complete with one delta per worker; the unacked delta (or the unpublished
    # release and tasks of round 2) were handled once.
    assert view.state == "completed"
    assert [r.result_version for r in view.rounds] == [2, 3]
    for r in view.rounds:
        assert sorted(d.worker for d in r.deltas) == ["w0", "w1"]
    check_oracle(cluster)
