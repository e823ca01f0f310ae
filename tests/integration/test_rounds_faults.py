"""Rounds under faults and bad deltas, on a real RabbitMQ with real processes (issues 4 and 6).

Every test ends with the same oracle, ``cluster.check_oracle()`` (coordinator/audit.py over the
whole database, given the deltas the workers' logs say were confirmed): every accepted delta is in
exactly one aggregated version or still pending in an open round, none counts twice, each
version's recorded delta count equals the rows aggregated into it, one version per closed round,
no version half-written. Kills at exact moments use the named fault points of common/faults.py.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pika
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from common import codec
from common.messages import DeltaReport
from common.model import DynamicDLModel
from common.model.bundle import code_of, join_model
from common.model.numpy_model import make_linear_model
from coordinator.cli.main import app
from coordinator.db.blobs import read_blob
from coordinator.db.models import Blob, BlobChunk, Delta, Task, Worker
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
    cluster.check_oracle()


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
    cluster.check_oracle()


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
    cluster.check_oracle()


def with_big_model(cluster: Cluster, n_in: int, workers: int = 2) -> None:
    """Register the model "big" (``n_in`` x 100 float32) and ``workers`` workers with 16 samples each."""
    cluster.register("big", make_linear_model(n_in, 100, model_id="big"))
    rng = np.random.default_rng(0)
    for i in range(workers):
        cluster.add_worker(
            f"w{i}", {"x": rng.random((16, n_in), dtype=np.float32), "y": rng.integers(0, 100, 16)}
        )


def test_a_model_larger_than_the_chunk_size_completes_a_round(sqlite_cluster: Cluster):
    # Prepare: a 40 MB model (100,000 x 100 float32) with 4 MB chunks (the transport path: SQLite only).
    cluster = sqlite_cluster
    with_big_model(cluster, 100_000)
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
        with db.session() as session:
            delta_blobs = session.scalars(select(Blob).join(Delta, Delta.weights_blob_id == Blob.id)).all()
            chunks = session.scalars(
                select(BlobChunk.blob_id).where(BlobChunk.blob_id.in_([b.id for b in delta_blobs]))
            )
            delta_chunks = list(chunks)
            # the digests the blob rows took from the transfers' checks are the files' (read_blob
            # raises otherwise): workers split each delta's digest where its frame starts
            assert all(len(read_blob(session, b.id)) == b.size for b in delta_blobs)
    assert info.weights_size > 40_000_000 > cluster.settings.chunk_size * 9
    # Each delta kept the file it was reassembled in (its frame after the message's header), in the
    # database's blob directory: not written into SQL, nor copied.
    assert len(delta_blobs) == 2 and delta_chunks == []
    assert all(b.file is not None and (b.file_offset or 0) > 0 for b in delta_blobs)
    cluster.check_oracle()


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
    cluster.check_oracle()


def test_a_task_whose_training_raises_every_time_is_dead_lettered_and_the_round_goes_on(
    sqlite_cluster: Cluster,
):
    # Prepare: w2's labels are outside the model's 3 classes, so its training raises (IndexError)
    # every time.
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
    cluster.check_oracle()


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
    cluster.check_oracle()


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
    cluster.check_oracle()


def test_worker_killed_mid_publish_of_a_chunked_delta_sends_it_whole_after_restart(sqlite_cluster: Cluster):
    # Prepare: a 6 MB model, so each delta travels as two 4 MiB chunks; w0 dies (SIGKILL) right
    # after the broker confirmed its delta's first chunk, before the second is sent.
    cluster = sqlite_cluster
    with_big_model(cluster, 15_000)
    cluster.start_coordinator()
    cluster.start_worker("w0", kill_at="publish-after-chunk-0")
    cluster.start_worker("w1")
    run_id = cluster.start_run("big", rounds=1, min_workers=2, train={"batch_size": 16})
    transfers = cluster.tmp_dir / "fedmq-transfers" / "fedmq.results"  # the coordinator's reassembly

    def half_sent() -> list[dict]:
        return [json.loads(p.read_text()) for p in transfers.glob("*.json")] if transfers.exists() else []

    # Execute
    assert cluster.wait_exit("w0") == -9
    cluster.wait_for("the coordinator to store the first chunk", lambda: len(half_sent()) == 1, timeout_s=60)
    cluster.start_worker("w0")
    view = cluster.wait_run(run_id, timeout_s=240)

    # Assert: the task came back and its delta arrived whole; the half-sent transfer (one chunk of
    # two, from w0) stayed incomplete — never handled, never counted — until its expiry drops it.
    assert view.state == "completed"
    (round_,) = view.rounds
    assert sorted((d.worker, d.status) for d in round_.deltas) == [("w0", "aggregated"), ("w1", "aggregated")]
    assert round_.metrics["deltas"] == 2
    (stuck,) = half_sent()
    assert stuck["sender"] == "w0" and stuck["received"] == [0] and stuck["header"]["count"] == 2
    cluster.check_oracle()


def test_coordinator_killed_inside_the_aggregation_transaction_closes_the_round_once(cluster: Cluster):
    # Prepare: the coordinator dies (SIGKILL) in its first aggregation, after the new version, the
    # round's closing and the next round were written in the transaction, before it commits.
    cluster.register("m", make_linear_model(4, 3, model_id="m"))
    for i, part in enumerate(gaussian_parts(2, 200)):
        cluster.add_worker(f"w{i}", part)
    cluster.start_coordinator(kill_at="coordinator-before-aggregation-commit")
    for i in range(2):
        cluster.start_worker(f"w{i}")
    run_id = cluster.start_run("m", rounds=2, min_workers=2)

    # Execute
    assert cluster.wait_exit("coordinator") == -9
    crashed = cluster.run(run_id)
    cluster.start_coordinator()
    view = cluster.wait_run(run_id)

    # Assert: nothing of the aggregation survived the crash (round 1 open with its two accepted
    # deltas, no version 2); after the restart each round closed once, into versions 2 and 3.
    assert crashed is not None and crashed.state == "running" and len(crashed.rounds) == 1
    assert crashed.rounds[0].state == "open" and crashed.rounds[0].result_version is None
    assert crashed.rounds[0].accepted == 2
    assert view.state == "completed" and [r.result_version for r in view.rounds] == [2, 3]
    for r in view.rounds:
        assert sorted(d.worker for d in r.deltas if d.status == "aggregated") == ["w0", "w1"]
    audit = cluster.check_oracle()
    assert audit.closed_rounds == audit.versions == 2


def _killing_model() -> DynamicDLModel:
    """The 4 -> 3 linear model whose training kills its process (SIGKILL, no exception, no cleanup)
    on labels beyond its classes, as native code reading out of bounds would."""
    model = make_linear_model(4, 3, model_id="m")
    code = code_of(model)
    learn = code.functions["incremental_learn_function"] or ""
    line = '    y = np.asarray(trainingOutputs).astype("int64").reshape(-1)\n'
    assert line in learn
    kill = "    if len(y) and y.max() >= modelObj.model[1].shape[0]:\n"
    kill += "        import os, signal\n        os.kill(os.getpid(), signal.SIGKILL)\n"
    functions = {**code.functions, "incremental_learn_function": learn.replace(line, line + kill)}
    return join_model(
        dataclasses.replace(code, functions=functions), [np.asarray(w) for w in model.get_weights()]
    )


def _run_with_a_worker_killed_by_its_task(cluster: Cluster, min_workers: int) -> tuple[str, int, dict]:
    """Three workers; w2's data kills it on every attempt of its task, and it is restarted each time
    (as systemd would) until the broker dead-letters the task. Returns the run id, how many times
    w2 died, and the dead-lettered task's headers."""
    cluster.register("m", _killing_model())
    parts = gaussian_parts(3, 100)
    parts[2]["y"] = parts[2]["y"] + 50
    for i, part in enumerate(parts):
        cluster.add_worker(f"w{i}", part)
    cluster.start_coordinator()
    for i in range(3):
        cluster.start_worker(f"w{i}")
    cluster.wait_workers_seen(["w0", "w1", "w2"])
    # A deadline far beyond the test's wait: only the coordinator noticing the dead-lettered task
    # (fedmq.dead-tasks) can end the round in time.
    run_id = cluster.start_run("m", rounds=1, min_workers=min_workers, deadline_s=3600.0)
    connection = pika.BlockingConnection(pika.URLParameters(cluster.settings.amqp_url))
    try:
        channel = connection.channel()
        deaths, deadline = 0, time.monotonic() + 180
        while not channel.queue_declare("fedmq.tasks.w2.dlq", passive=True).method.message_count:
            assert time.monotonic() < deadline, (
                f"w2's task was never dead-lettered:\n{cluster.log('w2')[-3000:]}"
            )
            if cluster.procs["w2"].poll() is not None:
                assert cluster.procs.pop("w2").returncode == -9
                deaths += 1
                cluster.start_worker("w2")
            time.sleep(0.2)
        method, properties, _ = channel.basic_get("fedmq.tasks.w2.dlq", auto_ack=True)
    finally:
        connection.close()
    if cluster.procs["w2"].poll() is not None:  # died a last time before the dead-lettering
        assert cluster.procs.pop("w2").returncode == -9
        deaths += 1
    assert method is not None
    return run_id, deaths, dict(properties.headers or {})


def test_a_task_that_kills_its_worker_every_time_is_dead_lettered_and_the_round_shrinks(
    sqlite_cluster: Cluster,
):
    cluster = sqlite_cluster
    # Execute: quorum 2 of 3
    run_id, deaths, headers = _run_with_a_worker_killed_by_its_task(cluster, min_workers=2)
    view = cluster.wait_run(run_id, timeout_s=120)

    # Assert: the broker gave up after its delivery limit (5 redeliveries) and dead-lettered the
    # task with its reason; the coordinator counted the task as failed and closed the round with the
    # other two workers' deltas at once, an hour before its deadline.
    assert deaths == 6
    assert headers["x-first-death-reason"] == "delivery_limit", headers
    assert headers["x-first-death-queue"] == "fedmq.tasks.w2"
    assert view.state == "completed"
    (round_,) = view.rounds
    assert round_.state == "closed" and round_.result_version == 2
    assert sorted(d.worker for d in round_.deltas if d.status == "aggregated") == ["w0", "w1"]
    assert round_.metrics["deltas"] == 2 and round_.answered == 3 == round_.tasks
    assert "task" in cluster.log("coordinator") and "dead-lettered by the broker" in cluster.log(
        "coordinator"
    )
    audit = cluster.check_oracle()
    assert audit.unanswered == 1  # w2's task: no delta, never counted


def test_a_task_that_kills_its_worker_every_time_fails_a_round_that_needs_it(sqlite_cluster: Cluster):
    cluster = sqlite_cluster
    # Execute: quorum 3 of 3
    run_id, deaths, headers = _run_with_a_worker_killed_by_its_task(cluster, min_workers=3)
    view = cluster.wait_run(run_id, timeout_s=120)

    # Assert: dead-lettered the same way; with every task answered and too few deltas, the round
    # and the run failed by their rule at once, with the reason in SQL (as `fedmq rounds show`
    # prints it), instead of waiting for the deadline an hour away.
    assert deaths == 6 and headers["x-first-death-reason"] == "delivery_limit", headers
    assert view.state == "failed"
    (round_,) = view.rounds
    assert round_.state == "failed" and round_.result_version is None
    assert round_.reason == "2 accepted deltas, quorum 3; every task answered"
    assert view.reason == "round 1: 2 accepted deltas, quorum 3; every task answered"
    audit = cluster.check_oracle()
    assert audit.dropped == 2 and audit.versions == 0  # the accepted deltas went with the round
