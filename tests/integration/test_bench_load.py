"""`fedmq bench load` at a small scale: every figure present, every delta counted exactly once.

The benchmark starts its own RabbitMQ node, SQLite database, coordinator process and simulated
worker processes, and must stop them all. Its deployment is kept (``--workdir``) so the oracle can
then be shown to notice a tampered database. The broker users of simulated workers are made in one
definitions import: a last test checks that import gives each user exactly ``worker_permissions``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from sqlalchemy import select, text, update
from typer.testing import CliRunner

from common.broker import BrokerConfig, OutgoingMessage, RabbitmqBroker, admin, fedmq_topology
from common.broker.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_TASKS_QUEUE,
    RELEASES_EXCHANGE,
    TASKS_EXCHANGE,
    dead_letter_queue_name,
    worker_task_queue,
)
from common.devbroker import rabbitmqctl
from common.settings import Settings
from coordinator.audit import audit_rounds
from coordinator.bench.load import queue_depths
from coordinator.cli.main import app
from coordinator.db import Database
from coordinator.db.models import Delta, ModelVersion, Round
from coordinator.workers import import_worker_users, worker_permissions

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("rabbitmq-server") is None, reason="rabbitmq-server is not installed"),
]

WORKERS, ROUNDS = 12, 3


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Not pytest's tmp_path: the RabbitMQ node runs as its own user and must traverse every parent.
    with tempfile.TemporaryDirectory(prefix="fedmq-test-bench-load-") as tmp:
        os.chmod(tmp, 0o755)
        yield Path(tmp) / "run"


@pytest.fixture(scope="module")
def figures(workdir: Path) -> dict[str, Any]:
    args = ["bench", "load", "--workers", str(WORKERS), "--rounds", str(ROUNDS), "--per-process", "6"]
    result = CliRunner().invoke(app, [*args, "--workdir", str(workdir), "--json"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return dict(json.loads(result.stdout))


@pytest.fixture
def db(workdir: Path, figures: dict[str, Any], tmp_path: Path) -> Iterator[Database]:
    """A copy of the run's database, for one test to tamper with."""
    for source in (workdir / "fedmq").glob("fedmq.db*"):  # with its -wal, -shm and -blobs, if any
        if source.is_dir():
            shutil.copytree(source, tmp_path / source.name)
        else:
            shutil.copy(source, tmp_path / source.name)
    database = Database.from_settings(Settings(database_url=f"sqlite:///{tmp_path / 'fedmq.db'}"))
    try:
        yield database
    finally:
        database.dispose()


def test_every_delta_is_counted_exactly_once(figures: dict[str, Any]) -> None:
    assert figures["run_state"] == "completed"
    assert figures["processes"] == 2 and figures["worker_errors"] == []
    assert figures["tasks"] == WORKERS * ROUNDS
    assert figures["deltas_confirmed"] == figures["deltas_accepted"] == WORKERS * ROUNDS
    assert figures["deltas_rejected"] == 0
    assert (
        figures["lost"]
        == figures["duplicated"]
        == figures["rounds_mismatched"]
        == figures["bad_versions"]
        == 0
    )
    assert figures["oracle_problems"] == []
    assert figures["dead_lettered"] == figures["messages_left"] == 0
    assert figures["oracle_ok"] is True and figures["target_met"] is True


def test_rates_latencies_and_memory_are_reported(figures: dict[str, Any]) -> None:
    assert len(figures["round_latency_s"]) == ROUNDS
    assert all(s > 0 for s in figures["round_latency_s"])
    assert 0 < figures["p50_round_s"] <= figures["p99_round_s"] <= max(figures["round_latency_s"])
    assert figures["deltas_per_s"] > 0
    assert figures["coordinator_peak_mb"] > 10  # a Python process with SQLAlchemy and numpy loaded


def _confirmed(db: Database, run_id: str) -> set[str]:
    with db.session() as session:
        rounds = select(Round.id).where(Round.run_id == run_id)
        return {t for t in session.scalars(select(Delta.task_id).where(Delta.round_id.in_(rounds))) if t}


def test_the_oracle_notices_a_lost_delta(figures: dict[str, Any], db: Database) -> None:
    confirmed = _confirmed(db, figures["run_id"])

    audit = audit_rounds(db, [figures["run_id"]], confirmed | {uuid.uuid4().hex})

    assert audit.lost == 1 and audit.duplicated == 0


def test_the_oracle_notices_a_version_counting_a_delta_twice(figures: dict[str, Any], db: Database) -> None:
    with db.session(write=True) as session:  # as a bug could, past the guards that keep versions immutable
        session.execute(text("DROP TRIGGER trg_model_versions_immutable"))
        version = session.scalars(select(ModelVersion).where(ModelVersion.round_id.is_not(None))).first()
        assert version is not None and version.metrics is not None
        metrics = {**version.metrics, "deltas": version.metrics["deltas"] + 1}
        session.execute(update(ModelVersion).where(ModelVersion.id == version.id).values(metrics=metrics))

    audit = audit_rounds(db, [figures["run_id"]], _confirmed(db, figures["run_id"]))

    assert audit.duplicated == 1 and audit.lost == 0


def test_the_oracle_notices_a_version_that_is_not_fedavg_of_its_deltas(
    figures: dict[str, Any], db: Database
) -> None:
    with db.session(write=True) as session:
        delta = session.scalars(select(Delta).where(Delta.status == "aggregated")).first()
        assert delta is not None
        delta.sample_count *= 3  # as if it had been added three times

    audit = audit_rounds(db, [figures["run_id"]], _confirmed(db, figures["run_id"]))

    assert audit.not_fedavg == 1


def test_one_import_gives_each_worker_user_its_least_privilege(rabbitmq: Any) -> None:
    names = [f"imp{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    passwords = {name: uuid.uuid4().hex for name in names}
    try:
        import_worker_users(rabbitmq.node, passwords)

        listed = json.loads(rabbitmqctl(rabbitmq.node, "list_permissions", "--formatter", "json"))
        granted = {p["user"]: (p["configure"], p["write"], p["read"]) for p in listed}
        assert {name: granted.get(name) for name in names} == {
            name: worker_permissions(name) for name in names
        }
        port = rabbitmq.node.port
        for name, password in passwords.items():
            with pika.BlockingConnection(
                pika.URLParameters(f"amqp://{name}:{password}@127.0.0.1:{port}/%2F")
            ):
                pass
    finally:
        for name in names:
            admin.delete_user(rabbitmq.node, name)


def test_dead_letters_and_messages_left_are_counted_from_the_queues_themselves(sqlite_cluster: Any) -> None:
    url = sqlite_cluster.settings.amqp_url
    broker = RabbitmqBroker(BrokerConfig(amqp_url=url), name="test-bench-load")
    try:
        broker.declare(fedmq_topology(("sim",)))
        broker.publish(OutgoingMessage(DEAD_LETTER_EXCHANGE, worker_task_queue("sim"), b"refused"))
        broker.publish(OutgoingMessage(TASKS_EXCHANGE, "sim", b"never taken"))
        broker.publish(OutgoingMessage(RELEASES_EXCHANGE, "", b"a release: not counted"))
    finally:
        broker.close()

    depths = queue_depths(url, ["sim"])

    # The dead-lettered task also reaches the coordinator's fedmq.dead-tasks (nobody consumes it here).
    assert depths == {
        dead_letter_queue_name(worker_task_queue("sim")): 1,
        DEAD_TASKS_QUEUE: 1,
        worker_task_queue("sim"): 1,
    }
