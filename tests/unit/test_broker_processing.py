"""The ack / retry / dead-letter rules every consumer follows, and the quorum-queue fallback."""

from __future__ import annotations

import os

import pika.exceptions as px

from common.broker.chunks import Reassembler, split_body
from common.broker.processing import DeliveryProcessor, Outcome, RawDelivery
from common.broker.topology import QueueSpec, Topology, declare


def _processor(tmp_path, handler, max_attempts=3) -> DeliveryProcessor:
    return DeliveryProcessor("q", handler, Reassembler(tmp_path), max_attempts)


def _always_fails(delivery):
    raise RuntimeError("boom")


def test_on_a_classic_queue_the_consumer_counts_failures_itself(tmp_path):
    processor = _processor(tmp_path, _always_fails)
    raw = RawDelivery(body=b"task", message_id="t-1")  # no x-delivery-count: a classic queue

    outcomes = [processor.process(raw).outcome for _ in range(3)]

    assert outcomes == [Outcome.RETRY, Outcome.RETRY, Outcome.DEAD_LETTER]


def test_on_a_quorum_queue_the_brokers_count_wins(tmp_path):
    processor = _processor(tmp_path, _always_fails)

    decision = processor.process(RawDelivery(body=b"task", headers={"x-delivery-count": 2}))

    assert decision.outcome is Outcome.DEAD_LETTER
    assert decision.attempts == 3


def test_a_success_is_acked_and_forgets_earlier_failures(tmp_path):
    calls = []

    def flaky(delivery):
        calls.append(delivery.attempts)
        if len(calls) == 1:
            raise RuntimeError("once")

    processor = _processor(tmp_path, flaky)
    raw = RawDelivery(body=b"task", message_id="t-2")

    assert [processor.process(raw).outcome for _ in range(2)] == [Outcome.RETRY, Outcome.ACK]
    assert calls == [1, 2]


def test_malformed_chunk_headers_are_dead_lettered_without_calling_the_handler(tmp_path):
    calls: list[object] = []
    processor = _processor(tmp_path, calls.append)

    decision = processor.process(RawDelivery(body=b"x", headers={"x-fedmq-transfer": "zz"}))

    assert decision.outcome is Outcome.DEAD_LETTER
    assert "chunk" in decision.reason
    assert calls == []


class _RefusesQuorum:
    """A connection to a broker without quorum queues (what RabbitMQ < 3.8 answers)."""

    def __init__(self):
        self.declared: dict[str, dict] = {}

    def channel(self):
        return self

    def exchange_declare(self, *args, **kwargs):
        pass

    def queue_declare(self, name, durable, arguments):
        if arguments.get("x-queue-type") == "quorum":
            raise px.ChannelClosedByBroker(406, "PRECONDITION_FAILED - invalid arg 'x-queue-type'")
        self.declared[name] = arguments

    def queue_bind(self, *args, **kwargs):
        pass

    def close(self):
        pass


def test_a_broker_that_refuses_quorum_queues_gets_classic_durable_ones(tmp_path, caplog):
    connection = _RefusesQuorum()

    declared = declare(connection, Topology((), (QueueSpec("q"),)))

    assert declared.kinds == {"q": "classic", "q.dlq": "classic"}
    assert connection.declared["q"]["x-dead-letter-routing-key"] == "q"
    assert "refused a quorum queue" in caplog.text


class _FullDisk(Reassembler):
    def add(self, header, data, sender=None, sync=True):
        raise OSError(28, "No space left on device")


def test_a_full_disk_is_retried_then_dead_lettered_not_looped_forever(tmp_path):
    processor = DeliveryProcessor("q", lambda d: None, _FullDisk(tmp_path), max_attempts=2)
    header, data = next(split_body(b"x" * 3000, 1024))
    raw = RawDelivery(body=bytes(data), headers=header.to_headers())

    outcomes = [processor.process(raw) for _ in range(2)]

    assert [d.outcome for d in outcomes] == [Outcome.RETRY, Outcome.DEAD_LETTER]
    assert "No space left" in outcomes[1].reason


def test_the_chunks_of_a_batch_are_made_durable_once_before_any_is_acked(tmp_path, monkeypatch):
    synced: list[int] = []
    reassembler = Reassembler(tmp_path)
    real_sync = reassembler.sync

    def sync() -> None:
        real_sync()
        synced.append(len(reassembler.in_progress()))

    monkeypatch.setattr(reassembler, "sync", sync)
    handled: list[bytes] = []
    processor = DeliveryProcessor("q", lambda d: handled.append(d.body), reassembler, max_attempts=2)
    body = os.urandom(5000)
    raws = [RawDelivery(body=bytes(data), headers=h.to_headers()) for h, data in split_body(body, 1024)]

    first = processor.process_batch(raws[:3])
    rest = processor.process_batch(raws[3:])

    assert [d.outcome for d in first + rest] == [Outcome.ACK] * 5
    assert synced == [1, 0]  # once per batch: the unfinished transfer recorded, then nothing left
    assert handled == [body]
