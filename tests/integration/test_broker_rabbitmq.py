"""The RabbitMQ layer against a real RabbitMQ node started by the suite (tests/fixtures/rabbitmq.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator

import pytest

from common.broker import BrokerConfig, Delivery, OutgoingMessage, RabbitmqBroker
from common.broker.admin import add_user, delete_user, set_permissions
from common.broker.chunks import ChunkHeader, CompletedTransfer, Reassembler
from common.broker.connection import connect
from common.broker.consumer import Consumer
from common.broker.message import REASON_HEADER
from common.broker.publisher import Publisher
from common.broker.topology import (
    RESULTS_QUEUE,
    Binding,
    ExchangeSpec,
    QueueSpec,
    Topology,
    dead_letter_queue_name,
    fedmq_topology,
    worker_release_queue,
    worker_task_queue,
)
from common.errors import (
    BrokerAccessRefusedError,
    BrokerChannelClosedError,
    BrokerUnreachableError,
    PoisonMessageError,
    UnroutableMessageError,
)

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
WAIT_S = 30.0


@pytest.fixture
def config(rabbitmq, tmp_path) -> BrokerConfig:
    return BrokerConfig(
        amqp_url=rabbitmq.amqp_url,
        chunk_size=4 * MIB,
        spill_dir=tmp_path / "transfers",
        max_delivery_attempts=3,
        reconnect_initial_s=0.2,
        reconnect_max_s=1.0,
    )


@pytest.fixture
def broker(config) -> Iterator[RabbitmqBroker]:
    broker = RabbitmqBroker(config, name=f"test-{uuid.uuid4().hex[:6]}")
    yield broker
    broker.close()


def _topology(queue: str, **queue_options) -> Topology:
    exchange = f"{queue}.ex"
    return Topology(
        (ExchangeSpec(exchange, "direct"),),
        (QueueSpec(queue, bindings=(Binding(exchange, "key"),), **queue_options),),
    )


@pytest.fixture
def queue(broker) -> str:
    name = f"q-{uuid.uuid4().hex[:8]}"
    broker.declare(_topology(name))
    return name


def _send(broker: RabbitmqBroker, queue: str, body: bytes, **fields) -> None:
    broker.publish(OutgoingMessage(f"{queue}.ex", "key", body, **fields))


def _consume(config: BrokerConfig, queue: str, handler: Callable[[Delivery], None], **options) -> Consumer:
    consumer = Consumer(config, queue, handler, **options)
    consumer.start()
    return consumer


def _receive(config: BrokerConfig, queue: str, count: int) -> list[bytes]:
    """The bodies of the first ``count`` messages consumed from ``queue``."""
    received: list[bytes] = []
    consumer = _consume(config, queue, lambda d: received.append(bytes(d.body)))
    try:
        _wait_for(lambda: len(received) >= count, f"{count} messages")
    finally:
        consumer.stop()
    return received


def _queue_depths(rabbitmq) -> dict[str, int]:
    rows = rabbitmq.ctl("list_queues", "--no-table-headers", "name", "messages").splitlines()
    return {name: int(count) for name, count in (row.split("\t") for row in rows if "\t" in row)}


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_declaring_the_topology_twice_is_harmless(broker, rabbitmq):
    name = f"q-{uuid.uuid4().hex[:8]}"
    topology = _topology(name, single_active_consumer=True)

    first = broker.declare(topology)
    second = broker.declare(topology)

    assert first.kinds == second.kinds == {name: "quorum", dead_letter_queue_name(name): "quorum"}
    types = dict(
        row.split("\t")
        for row in rabbitmq.ctl("list_queues", "--no-table-headers", "name", "type").splitlines()
        if "\t" in row
    )
    assert types[name] == types[dead_letter_queue_name(name)] == "quorum"


def _queue_types(rabbitmq) -> dict[str, str]:
    rows = rabbitmq.ctl("list_queues", "--no-table-headers", "name", "type").splitlines()
    return dict(row.split("\t") for row in rows if "\t" in row)


def test_release_queues_are_classic_and_an_older_quorum_one_is_kept(broker, rabbitmq):
    new, old = f"w-{uuid.uuid4().hex[:8]}", f"w-{uuid.uuid4().hex[:8]}"
    broker.declare(Topology(queues=(QueueSpec(worker_release_queue(old)),)))  # as before: quorum

    declared = broker.declare(fedmq_topology((new, old)))

    types = _queue_types(rabbitmq)
    assert declared.kinds[worker_release_queue(new)] == types[worker_release_queue(new)] == "classic"
    assert declared.kinds[worker_release_queue(old)] == types[worker_release_queue(old)] == "quorum"
    assert types[worker_task_queue(new)] == types[RESULTS_QUEUE] == "quorum"
    assert broker.declare(fedmq_topology((new, old))).kinds == declared.kinds  # and again, harmlessly


def test_a_mandatory_message_no_queue_takes_raises_our_error(broker, queue):
    with pytest.raises(UnroutableMessageError):
        broker.publish(OutgoingMessage(f"{queue}.ex", "no-such-key", b"lost?"))


def test_a_chunked_message_no_queue_takes_raises_our_error_too(broker, config, queue):
    # Its chunks go out several at a time: the return of any of them still fails the publish.
    with pytest.raises(UnroutableMessageError):
        broker.publish(OutgoingMessage(f"{queue}.ex", "no-such-key", os.urandom(3 * config.chunk_size)))


def test_a_chunked_body_is_sent_as_exactly_its_chunks_also_after_a_lost_connection(
    broker, config, queue, rabbitmq
):
    # Prepare: the publisher's connection (and its chunk channel) is closed by the broker.
    _send(broker, queue, b"first")
    rabbitmq.ctl("close_all_connections", "test: connections closed")
    body = os.urandom(10 * config.chunk_size + 5)

    # Execute: published with up to CHUNK_WINDOW chunks unconfirmed
    _send(broker, queue, body, message_id="big")

    # Assert: 1 + 11 messages queued (no chunk twice, none missing), and the body arrives whole.
    _wait_for(lambda: _queue_depths(rabbitmq).get(queue) == 12, "the twelve messages")
    received: list[tuple[str | None, bytes]] = []
    consumer = _consume(config, queue, lambda d: received.append((d.message_id, d.body)), prefetch=4)
    try:
        _wait_for(lambda: len(received) == 2, "both messages")
    finally:
        consumer.stop()
    assert received[0][1] == b"first" and received[1] == ("big", body)


def test_a_40_mb_body_arrives_intact_in_4_mb_chunks_with_bounded_memory(broker, config, queue):
    body = os.urandom(40 * MIB)
    expected = hashlib.sha256(body).hexdigest()
    _send(broker, queue, body, message_id="weights")
    del body
    seen: list[tuple[str | None, int, str]] = []
    done = threading.Event()

    def handler(delivery: Delivery) -> None:
        digest = hashlib.sha256()
        with delivery.open() as stream:
            while block := stream.read(MIB):
                digest.update(block)
        seen.append((delivery.message_id, delivery.size, digest.hexdigest()))
        done.set()

    tracemalloc.start()
    consumer = _consume(config, queue, handler, prefetch=2)
    try:
        assert done.wait(WAIT_S)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        consumer.stop()

    assert seen == [("weights", 40 * MIB, expected)]
    assert peak < 20 * MIB, f"reassembly peaked at {peak / MIB:.1f} MiB for a 40 MiB body"


def test_a_chunked_body_whose_digest_is_split_arrives_with_its_tails_verified_digest(broker, config, queue):
    """What the coordinator's intake and the workers' releases rely on: the receiver learns the
    sha256 of the body's tail (a weight frame) from the transfer's check, over a real broker."""
    head, tail = os.urandom(5000), os.urandom(6 * MIB)
    body = head + tail
    _send(broker, queue, body, message_id="split", tail_offset=len(head))
    _send(broker, queue, tail, message_id="whole")
    _send(broker, queue, b"small", message_id="small", tail_offset=2)
    seen: dict[str | None, tuple[bytes | bytearray, tuple[int, str] | None]] = {}
    consumer = _consume(config, queue, lambda d: seen.update({d.message_id: (d.body, d.verified_tail)}))
    try:
        _wait_for(lambda: len(seen) == 3, "three messages")
    finally:
        consumer.stop()

    digest = hashlib.sha256(tail).hexdigest()
    assert seen["split"] == (body, (len(head), digest))
    assert seen["whole"] == (tail, (0, digest))
    assert seen["small"] == (b"small", None)  # sent whole: nothing was hashed, nothing to reuse


def test_a_publisher_blocked_by_a_resource_alarm_says_why_and_resumes(config, queue, rabbitmq, caplog):
    """A broker short of memory or disk blocks publishers; the log says so instead of a silent stall."""
    caplog.set_level(logging.WARNING, logger="common.broker.connection")
    publisher = Publisher(config, name="alarmed-publisher")
    publisher.publish(OutgoingMessage(f"{queue}.ex", "key", b"before"))
    sent = threading.Event()
    rabbitmq.ctl("set_vm_memory_high_watermark", "0.0000001")  # a memory alarm, at once
    try:
        blocked = threading.Thread(
            target=lambda: (publisher.publish(OutgoingMessage(f"{queue}.ex", "key", b"during")), sent.set())
        )
        blocked.start()
        _wait_for(lambda: "RabbitMQ blocks publishing" in caplog.text, "the blocked warning")
        assert not sent.is_set()
    finally:
        rabbitmq.ctl("set_vm_memory_high_watermark", "0.4")
    blocked.join(WAIT_S)
    assert sent.is_set() and "alarm cleared; publishing resumes" in caplog.text
    assert "alarmed-publisher" in caplog.text
    publisher.close()


def test_a_message_that_always_fails_is_dead_lettered_with_the_reason(broker, config, queue, rabbitmq):
    attempts: list[int] = []
    dead: list[Delivery] = []

    def failing(delivery: Delivery) -> None:
        attempts.append(delivery.attempts)
        raise RuntimeError("cannot train on this")

    _send(broker, queue, b"poison task", message_id="t-1")
    consumer = _consume(config, queue, failing)
    dlq_consumer = _consume(config, dead_letter_queue_name(queue), dead.append)
    try:
        _wait_for(lambda: len(dead) == 1, "the dead-lettered message")
    finally:
        consumer.stop()
        dlq_consumer.stop()

    assert attempts == [1, 2, 3]
    assert dead[0].body == b"poison task"
    assert dead[0].message_id == "t-1"
    assert "failed 3 times" in dead[0].headers[REASON_HEADER]
    assert "cannot train on this" in dead[0].headers[REASON_HEADER]
    assert _queue_depths(rabbitmq)[queue] == 0


def test_a_message_is_acked_only_after_the_handler_returns(broker, config, queue, rabbitmq):
    calls: list[bool] = []
    in_handler = threading.Event()
    release = threading.Event()

    def handler(delivery: Delivery) -> None:
        calls.append(delivery.redelivered)
        if len(calls) == 1:
            in_handler.set()
            release.wait(WAIT_S)

    _send(broker, queue, b"task")
    consumer = _consume(config, queue, handler)
    try:
        assert in_handler.wait(WAIT_S)
        rabbitmq.ctl("close_all_connections", "test: connection lost mid-handle")
        release.set()
        _wait_for(lambda: len(calls) == 2, "the redelivery")
        _wait_for(lambda: _queue_depths(rabbitmq)[queue] == 0, "the ack of the redelivered message")
    finally:
        consumer.stop()

    assert calls == [False, True]
    assert consumer.connections_opened == 2


def test_a_handler_longer_than_the_heartbeat_keeps_its_connection(config, broker, queue, rabbitmq):
    short_heartbeat = BrokerConfig(**{**vars(config), "heartbeat_s": 2})
    handled: list[bytes] = []

    def slow(delivery: Delivery) -> None:
        time.sleep(6)
        handled.append(delivery.body)

    _send(broker, queue, b"long training step")
    consumer = _consume(short_heartbeat, queue, slow)
    try:
        _wait_for(lambda: handled == [b"long training step"], "the slow handler")
        _wait_for(lambda: _queue_depths(rabbitmq)[queue] == 0, "the ack")
    finally:
        consumer.stop()

    assert handled == [b"long training step"]
    assert consumer.connections_opened == 1


def test_only_one_consumer_of_a_single_active_consumer_queue_receives(broker, config, rabbitmq):
    name = f"q-{uuid.uuid4().hex[:8]}"
    broker.declare(_topology(name, single_active_consumer=True))
    first: list[bytes] = []
    second: list[bytes] = []
    active = _consume(config, name, lambda d: first.append(d.body), name="coordinator-a")
    _wait_for(lambda: active.connections_opened == 1, "the first consumer")
    time.sleep(0.5)
    standby = _consume(config, name, lambda d: second.append(d.body), name="coordinator-b")
    try:
        for i in range(6):
            _send(broker, name, f"m{i}".encode())
        _wait_for(lambda: len(first) + len(second) == 6, "all messages")
        active.stop()
        _send(broker, name, b"after failover")
        _wait_for(lambda: b"after failover" in first + second, "the standby to take over")
    finally:
        active.stop()
        standby.stop()

    assert first == [f"m{i}".encode() for i in range(6)]
    assert second == [b"after failover"]


def test_a_worker_user_is_confined_and_its_user_id_is_validated(broker, config, queue, rabbitmq):
    worker = f"w-{uuid.uuid4().hex[:6]}"
    add_user(rabbitmq.node, worker, "s3cret")
    set_permissions(rabbitmq.node, worker, "^$", f"^{queue}\\.ex$", "^$")
    port = rabbitmq.port
    worker_config = BrokerConfig(
        **{**vars(config), "amqp_url": f"amqp://{worker}:s3cret@127.0.0.1:{port}/%2F"}
    )
    worker_broker = RabbitmqBroker(worker_config, name=worker)
    received: list[str | None] = []
    consumer = _consume(config, queue, lambda d: received.append(d.user_id))
    try:
        worker_broker.publish(OutgoingMessage(f"{queue}.ex", "key", b"delta"))
        with pytest.raises(BrokerAccessRefusedError):
            worker_broker.publish(OutgoingMessage("fedmq.dlx", queue, b"not allowed"))
        _wait_for(lambda: received == [worker], "the worker's message")
    finally:
        consumer.stop()
        worker_broker.close()
        delete_user(rabbitmq.node, worker)


class _CountingReassembler(Reassembler):
    """Counts the chunks it stores and calls ``after(n)`` after each one."""

    def __init__(self, directory, after: Callable[[int], None] = lambda n: None) -> None:
        super().__init__(directory)
        self.stored = 0
        self.after = after

    def add(
        self, header: ChunkHeader, data: bytes | memoryview, sender: str | None = None, sync: bool = True
    ) -> CompletedTransfer | None:
        result = super().add(header, data, sender, sync)
        self.stored += 1
        self.after(self.stored)
        return result


def test_a_consumer_restarted_mid_transfer_resumes_it(broker, config, queue):
    body = os.urandom(40 * MIB)
    expected = hashlib.sha256(body).hexdigest()
    _send(broker, queue, body)
    del body
    digests: list[str] = []
    three_stored = threading.Event()

    def after(stored: int) -> None:
        if stored >= 3:
            three_stored.set()

    first = _CountingReassembler(config.transfers_dir(queue), after)
    consumer = _consume(config, queue, lambda d: digests.append("first run"), prefetch=1, reassembler=first)
    assert three_stored.wait(WAIT_S)
    consumer.stop()

    second = _CountingReassembler(config.transfers_dir(queue))
    restarted = _consume(
        config, queue, lambda d: digests.append(hashlib.sha256(d.body).hexdigest()), reassembler=second
    )
    try:
        _wait_for(lambda: len(digests) == 1, "the reassembled body")
    finally:
        restarted.stop()

    assert digests == [expected]
    assert second.stored < 10, "the restarted consumer fetched every chunk again instead of resuming"


def test_the_publisher_reconnects_after_losing_its_connection(broker, config, queue, rabbitmq):
    _send(broker, queue, b"before")
    rabbitmq.ctl("close_all_connections", "test: broker restarted")

    _send(broker, queue, b"after")

    assert _receive(config, queue, 2) == [b"before", b"after"]


def test_a_publisher_left_idle_past_its_heartbeat_publishes_again_without_errors(config, queue, caplog):
    # A worker's delta publisher sits unused between rounds, longer than the heartbeat timeout
    # (2 s here; the broker drops a silent connection after about that long).
    quick = BrokerConfig(**{**vars(config), "heartbeat_s": 2})
    publisher = Publisher(quick, name="idle-publisher")
    try:
        publisher.publish(OutgoingMessage(f"{queue}.ex", "key", b"round 1"))
        time.sleep(6)
        with caplog.at_level(logging.INFO):
            publisher.publish(OutgoingMessage(f"{queue}.ex", "key", b"round 2"))
    finally:
        publisher.close()

    assert _receive(config, queue, 2) == [b"round 1", b"round 2"]
    noise = [
        f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING
    ]
    assert noise == []


def test_a_tls_connection_verifies_the_broker_and_presents_a_client_certificate(config, queue, rabbitmq):
    tls_config = BrokerConfig(
        **{
            **vars(config),
            "amqp_url": rabbitmq.amqps_url,
            "tls_ca_file": str(rabbitmq.pki.ca_file),
            "tls_cert_file": str(rabbitmq.pki.client_cert),
            "tls_key_file": str(rabbitmq.pki.client_key),
        }
    )
    received: list[bytes] = []
    tls_broker = RabbitmqBroker(tls_config, name="tls")
    consumer = _consume(tls_config, queue, lambda d: received.append(d.body))
    try:
        tls_broker.publish(OutgoingMessage(f"{queue}.ex", "key", b"over TLS"))
        _wait_for(lambda: received == [b"over TLS"], "the message over TLS")
    finally:
        consumer.stop()
        tls_broker.close()


def test_a_broker_whose_certificate_is_not_trusted_is_refused(config, rabbitmq):
    untrusting = BrokerConfig(**{**vars(config), "amqp_url": rabbitmq.amqps_url, "tls_ca_file": None})

    with pytest.raises(BrokerUnreachableError, match=r"(?i)certificate|ssl"):
        connect(untrusting, "untrusting")


def test_a_message_that_kills_its_consumer_every_time_ends_in_the_dead_letter_queue(broker, config, rabbitmq):
    name = f"q-{uuid.uuid4().hex[:8]}"
    broker.declare(_topology(name, delivery_limit=2))
    deliveries: list[int] = []
    dead: list[Delivery] = []

    def crashing(delivery: Delivery) -> None:
        deliveries.append(delivery.attempts)
        rabbitmq.ctl("close_all_connections", "test: the consumer process died")

    _send(broker, name, b"kills the worker")
    consumer = _consume(config, name, crashing)
    try:
        _wait_for(lambda: len(deliveries) == 3, "three deliveries")
    finally:
        consumer.stop()
    dlq_consumer = _consume(config, dead_letter_queue_name(name), dead.append)
    try:
        _wait_for(lambda: len(dead) == 1, "the broker to dead-letter the message")
    finally:
        dlq_consumer.stop()

    assert deliveries == [1, 2, 3]
    assert dead[0].body == b"kills the worker"
    assert [d["reason"] for d in dead[0].headers["x-death"]] == ["delivery_limit"]


def test_a_worker_without_rights_on_the_dead_letter_exchange_still_dead_letters(
    broker, config, queue, rabbitmq
):
    worker = f"w-{uuid.uuid4().hex[:6]}"
    add_user(rabbitmq.node, worker, "s3cret")
    set_permissions(rabbitmq.node, worker, "^$", "^$", f"^{queue}$")
    worker_config = BrokerConfig(
        **{**vars(config), "amqp_url": f"amqp://{worker}:s3cret@127.0.0.1:{rabbitmq.port}/%2F"}
    )
    seen: list[bytes] = []
    dead: list[Delivery] = []

    def refuses(delivery: Delivery) -> None:
        seen.append(delivery.body)
        raise PoisonMessageError("unknown task kind")

    _send(broker, queue, b"first")
    _send(broker, queue, b"second")
    consumer = _consume(worker_config, queue, refuses)
    dlq_consumer = _consume(config, dead_letter_queue_name(queue), dead.append)
    try:
        _wait_for(lambda: len(dead) == 2, "both messages in the dead-letter queue")
    finally:
        consumer.stop()
        dlq_consumer.stop()
        delete_user(rabbitmq.node, worker)

    assert seen == [b"first", b"second"]
    assert [d.body for d in dead] == [b"first", b"second"]
    assert [d.headers["x-death"][0]["reason"] for d in dead] == ["rejected", "rejected"]
    assert consumer.error is None


def test_a_consumer_whose_queue_is_deleted_stops_with_a_clear_error(config, queue, rabbitmq):
    consumer = _consume(config, queue, lambda d: None)
    _wait_for(lambda: consumer.connections_opened == 1, "the consumer to connect")

    rabbitmq.ctl("delete_queue", queue)
    _wait_for(lambda: consumer.error is not None, "the consumer to give up")

    assert isinstance(consumer.error, BrokerChannelClosedError)
    assert consumer.error.reply_code == 404


@pytest.mark.parametrize("durable", [True, False])
def test_chunks_are_fsynced_before_their_ack_unless_the_consumer_says_they_need_not_be(
    broker, queue, monkeypatch, durable
):
    body = os.urandom(10 * MIB)  # three 4 MiB chunks
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    received: list[bytes] = []
    _send(broker, queue, body)

    consumer = broker.consumer(queue, lambda d: received.append(d.body), prefetch=4, durable_chunks=durable)
    consumer.start()
    try:
        _wait_for(lambda: len(received) == 1, "the reassembled body")
    finally:
        consumer.stop()

    assert received == [body]
    assert bool(fsyncs) is durable
