"""Least privilege on the broker: what a worker's own RabbitMQ user can and cannot do.

Two workers are added with :func:`coordinator.workers.add_worker` (their users, permissions, queues
and config files, as ``fedmq workers add`` makes them) on the suite's real RabbitMQ node, in a
virtual host of their own. Each test connects with pika and the URL from a worker's config file, so
every refusal is the broker's own: ACCESS_REFUSED (403) for what the user's permissions forbid,
PRECONDITION_FAILED (406) for a ``user_id`` that is not the authenticated user.

The coordinator-side half of identity (a delta whose ``worker`` field names another worker than the
broker-validated ``user_id`` is rejected with the reason) is checked here against the round engine
on SQLite, and end to end in tests/integration/test_rounds_faults.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy import select

from common import codec
from common.broker import admin
from common.broker.topology import (
    CONTROL_QUEUE,
    DEAD_LETTER_EXCHANGE,
    FETCH_QUEUE,
    RELEASES_EXCHANGE,
    RESULTS_EXCHANGE,
    RESULTS_QUEUE,
    RESULTS_ROUTE,
    TASKS_EXCHANGE,
    dead_letter_queue_name,
    worker_release_queue,
    worker_task_queue,
)
from common.messages import DeltaReport, StartRun
from common.model.numpy_model import make_linear_model
from coordinator.db.models import Task, Worker
from coordinator.registry import KeySigner, ModelRegistry
from coordinator.rounds import RoundEngine
from coordinator.workers import add_worker
from tests.integration.cluster import Cluster
from worker.config import load_worker_config

pytestmark = pytest.mark.integration

ACCESS_REFUSED = 403
PRECONDITION_FAILED = 406


@dataclass(frozen=True)
class Deployment:
    cluster: Cluster
    alice: str
    bob: str
    urls: dict[str, str]

    @property
    def admin_url(self) -> str:
        return self.cluster.settings.amqp_url


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, rabbitmq: Any) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("least-privilege")
    broker_dir = Path(rabbitmq.node.directory)
    cluster = Cluster.create(root, f"sqlite:///{root / 'fedmq.db'}", rabbitmq.amqp_url, broker_dir)
    tag = uuid.uuid4().hex[:6]
    names = (f"lp{tag}-alice", f"lp{tag}-bob")
    urls = {}
    try:
        with cluster.database() as db:
            for name in names:
                config = root / "workers" / f"{name}.toml"
                add_worker(cluster.settings, db, name, config, broker_dir=broker_dir)
                urls[name] = load_worker_config(config).amqp_url
        yield Deployment(cluster, names[0], names[1], urls)
    finally:
        for name in names:
            admin.delete_user(rabbitmq.node, name)
        cluster.stop_all()


def open_channel(url: str) -> tuple[pika.BlockingConnection, BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    return connection, channel


def broker_refusal(url: str, action: Callable[[BlockingChannel], object]) -> tuple[int, str]:
    """Run ``action`` on a fresh channel as the user of ``url``; the broker's (reply code, text)."""
    connection, channel = open_channel(url)
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            action(channel)
            channel.basic_qos(prefetch_count=1)  # a round trip: an asynchronous close surfaces here
        return info.value.reply_code, info.value.reply_text
    finally:
        if connection.is_open:
            connection.close()


def publish(
    exchange: str, routing_key: str, user_id: str | None = None, message_id: str | None = None
) -> Callable[[BlockingChannel], None]:
    def action(channel: BlockingChannel) -> None:
        channel.basic_publish(
            exchange,
            routing_key,
            b"x",
            pika.BasicProperties(user_id=user_id, delivery_mode=2, message_id=message_id or uuid.uuid4().hex),
            mandatory=True,
        )

    return action


def publish_as(url: str, action: Callable[[BlockingChannel], None]) -> None:
    """Publish with confirms: when this returns the broker has routed and stored the message."""
    connection, channel = open_channel(url)
    try:
        action(channel)
    finally:
        connection.close()


def receive(url: str, queue: str, message_id: str) -> pika.spec.BasicProperties | None:
    """Consume ``queue`` (acking what it reads) until the message ``message_id``; its properties.

    Consuming, not basic.get: the coordinator's queues are single-active-consumer quorum queues.
    """
    connection, channel = open_channel(url)
    try:
        for method, properties, _body in channel.consume(queue, inactivity_timeout=30):
            if method is None:
                return None
            channel.basic_ack(method.delivery_tag)
            if properties.message_id == message_id:
                channel.cancel()
                return properties
        return None
    finally:
        connection.close()


def message_count(url: str, queue: str) -> int:
    connection, channel = open_channel(url)
    try:
        return int(channel.queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


# ------------------------------------------------------------------------------ what it cannot do


@pytest.mark.parametrize(
    ("what", "exchange", "routing_key"),
    [
        ("the releases exchange", RELEASES_EXCHANGE, ""),
        ("the tasks exchange (a task for itself)", TASKS_EXCHANGE, "self"),
        ("the tasks exchange (a task for another worker)", TASKS_EXCHANGE, "other"),
        ("the default exchange into the control queue", "", CONTROL_QUEUE),
        ("the default exchange into the results queue", "", RESULTS_QUEUE),
        ("the default exchange into the fetch queue", "", FETCH_QUEUE),
        ("the default exchange into another worker's task queue", "", "other-tasks"),
        ("amq.topic", "amq.topic", "#"),
    ],
)
def test_a_worker_cannot_publish_to(deployment: Deployment, what: str, exchange: str, routing_key: str):
    me, other = deployment.alice, deployment.bob
    key = {"self": me, "other": other, "other-tasks": worker_task_queue(other)}.get(routing_key, routing_key)

    code, text = broker_refusal(deployment.urls[me], publish(exchange, key, user_id=me))

    assert code == ACCESS_REFUSED, (what, text)
    assert f"access to exchange '{exchange or 'amq.default'}'" in text, text


@pytest.mark.parametrize(
    "queue",
    ["other-tasks", "other-releases", RESULTS_QUEUE, CONTROL_QUEUE, FETCH_QUEUE, "control-dlq"],
)
def test_a_worker_cannot_read_a_queue_that_is_not_its_own(deployment: Deployment, queue: str):
    other = deployment.bob
    name = {
        "other-tasks": worker_task_queue(other),
        "other-releases": worker_release_queue(other),
        "control-dlq": dead_letter_queue_name(CONTROL_QUEUE),
    }.get(queue, queue)

    for action in (
        lambda ch: ch.basic_get(name, auto_ack=False),
        lambda ch: ch.basic_consume(name, lambda *a: None),
    ):
        code, text = broker_refusal(deployment.urls[deployment.alice], action)

        assert code == ACCESS_REFUSED and f"access to queue '{name}'" in text, text


def test_a_worker_cannot_bind_its_queue_to_receive_another_workers_tasks(deployment: Deployment):
    me, other = deployment.alice, deployment.bob

    code, text = broker_refusal(
        deployment.urls[me],
        lambda ch: ch.queue_bind(worker_task_queue(me), TASKS_EXCHANGE, routing_key=other),
    )

    assert code == ACCESS_REFUSED, text


@pytest.mark.parametrize(
    ("what", "action"),
    [
        ("declare a queue", lambda ch, me, other: ch.queue_declare(f"{me}-own-queue", durable=True)),
        ("declare an exchange", lambda ch, me, other: ch.exchange_declare(f"{me}-x", "fanout")),
        ("delete another worker's queue", lambda ch, me, other: ch.queue_delete(worker_task_queue(other))),
        ("purge another worker's queue", lambda ch, me, other: ch.queue_purge(worker_task_queue(other))),
        ("delete its own queue", lambda ch, me, other: ch.queue_delete(worker_task_queue(me))),
        ("delete the results exchange", lambda ch, me, other: ch.exchange_delete(RESULTS_EXCHANGE)),
    ],
)
def test_a_worker_configures_nothing(deployment: Deployment, what: str, action: Any):
    me, other = deployment.alice, deployment.bob

    code, text = broker_refusal(deployment.urls[me], lambda ch: action(ch, me, other))

    assert code == ACCESS_REFUSED, (what, text)


@pytest.mark.parametrize("claimed", ["other", "bob", "coordinator", "guest", ""])
def test_a_worker_cannot_spoof_another_user_id(deployment: Deployment, claimed: str):
    me = deployment.alice
    user_id = {"bob": deployment.bob}.get(claimed, claimed)

    code, text = broker_refusal(
        deployment.urls[me], publish(RESULTS_EXCHANGE, RESULTS_ROUTE, user_id=user_id or "")
    )

    assert code == PRECONDITION_FAILED, text
    assert "user_id" in text, text


def test_a_worker_cannot_log_in_with_another_workers_password(deployment: Deployment):
    mine = pika.URLParameters(deployment.urls[deployment.alice])
    theirs = pika.URLParameters(deployment.urls[deployment.bob])
    assert isinstance(mine.credentials, pika.PlainCredentials)
    assert isinstance(theirs.credentials, pika.PlainCredentials)
    theirs.credentials = pika.PlainCredentials(deployment.bob, mine.credentials.password)

    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(theirs)


# ---------------------------------------------------------------------------------- what it can do


def test_a_worker_publishes_results_with_its_own_user_id(deployment: Deployment):
    me, message_id = deployment.alice, uuid.uuid4().hex

    publish_as(
        deployment.urls[me], publish(RESULTS_EXCHANGE, RESULTS_ROUTE, user_id=me, message_id=message_id)
    )
    properties = receive(deployment.admin_url, RESULTS_QUEUE, message_id)

    assert properties is not None and properties.user_id == me


def test_a_worker_consumes_its_own_task_and_release_queues(deployment: Deployment):
    me, task_id, release_id = deployment.alice, uuid.uuid4().hex, uuid.uuid4().hex

    publish_as(deployment.admin_url, publish(TASKS_EXCHANGE, me, message_id=task_id))  # the coordinator
    publish_as(deployment.admin_url, publish(RELEASES_EXCHANGE, "", message_id=release_id))

    assert receive(deployment.urls[me], worker_task_queue(me), task_id) is not None
    assert receive(deployment.urls[me], worker_release_queue(me), release_id) is not None


def test_the_dead_letter_exchange_a_worker_may_write_reaches_only_dead_letter_queues(deployment: Deployment):
    """Workers may write to the DLX (to dead-letter with a reason); it routes to .dlq queues only."""
    me, admin_url = deployment.alice, deployment.admin_url
    dlq = dead_letter_queue_name(CONTROL_QUEUE)
    before = message_count(admin_url, CONTROL_QUEUE), message_count(admin_url, dlq)

    publish_as(deployment.urls[me], publish(DEAD_LETTER_EXCHANGE, CONTROL_QUEUE, user_id=me))

    assert message_count(admin_url, CONTROL_QUEUE) == before[0]  # nothing reached the coordinator
    assert message_count(admin_url, dlq) == before[1] + 1


# ------------------------------------------------------------------- identity on the coordinator


def test_the_coordinator_rejects_a_delta_whose_worker_is_not_the_broker_validated_user(
    deployment: Deployment,
):
    """The broker vouches for ``user_id``; the coordinator holds every delta to it (and to the task)."""
    alice, bob, cluster = deployment.alice, deployment.bob, deployment.cluster
    cluster.register("lp-model", make_linear_model(4, 3, model_id="lp-model"))
    with cluster.database() as db:
        registry = ModelRegistry(db, KeySigner.from_settings(cluster.settings))
        engine = RoundEngine(db, registry)
        engine.start_run(
            StartRun(
                run_id=uuid.uuid4().hex,
                model="lp-model",
                rounds=1,
                min_workers=2,
                deadline_s=600.0,
                workers=[alice, bob],
            )
        )
        base = registry.version("lp-model", 1)
        weights = registry.weights("lp-model", 1)
        with db.session() as session:
            rows = session.execute(select(Worker.name, Task).join(Task, Task.worker_id == Worker.id)).all()
            tasks = {name: t for name, t in rows}

        def report(task_of: str, worker: str) -> DeltaReport:
            return DeltaReport(
                task_id=tasks[task_of].task_id,
                round_id=tasks[task_of].round_id,
                worker=worker,
                model="lp-model",
                base_version=1,
                base_weights_sha256=base.weights_sha256,
                sample_count=10,
                payload=codec.encode_weights([np.zeros_like(w) for w in weights]),
            )

        # Execute: bob (authenticated as bob) sends a delta for alice's task naming her, then naming
        # himself; a delta without user_id; alice's own delta; bob names alice on his own task.
        bob_as_alice = engine.record_delta(report(alice, alice), user_id=bob)
        bob_on_alices_task = engine.record_delta(report(alice, bob), user_id=bob)
        anonymous = engine.record_delta(report(alice, alice), user_id=None)
        genuine = engine.record_delta(report(alice, alice), user_id=alice)
        bob_naming_alice = engine.record_delta(report(bob, alice), user_id=bob)

    assert bob_as_alice.status == "rejected"
    assert f"sent by broker user '{bob}', not by worker '{alice}'" in bob_as_alice.reason
    assert bob_on_alices_task.status == "rejected"
    assert f"belongs to {alice}, not {bob}" in bob_on_alices_task.reason
    assert anonymous.status == "rejected" and "sent by broker user None" in anonymous.reason
    assert (
        bob_naming_alice.status == "rejected" and f"belongs to {bob}, not {alice}" in bob_naming_alice.reason
    )
    assert genuine.status == "accepted"  # the spoofed deltas did not take the task from its worker
