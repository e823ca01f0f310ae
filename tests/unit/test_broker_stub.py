"""The in-memory broker: routing, chunked transfers and the ack / retry / dead-letter rules."""

from __future__ import annotations

import os

import pytest

from common.broker import BrokerConfig, OutgoingMessage, StubBroker
from common.broker.message import ORIGINAL_USER_HEADER, REASON_HEADER
from common.broker.stub import topic_matches
from common.broker.topology import Binding, ExchangeSpec, QueueSpec, Topology, dead_letter_queue_name
from common.errors import DecodeError, PoisonMessageError, UnroutableMessageError

QUEUE = "jobs"
DLQ = dead_letter_queue_name(QUEUE)


@pytest.fixture
def broker(tmp_path):
    stub = StubBroker(BrokerConfig(chunk_size=1024, spill_dir=tmp_path, max_delivery_attempts=3))
    stub.declare(
        Topology(
            (ExchangeSpec("work", "direct"), ExchangeSpec("news", "fanout"), ExchangeSpec("t", "topic")),
            (
                QueueSpec(QUEUE, bindings=(Binding("work", "job"), Binding("t", "model.*.done"))),
                QueueSpec("other", bindings=(Binding("news"),)),
            ),
        )
    )
    return stub


class _Received(list):
    """Deliveries seen by a handler, with their bodies read while the handler ran."""

    def __call__(self, delivery):
        self.append(delivery)
        self.bodies.append(delivery.body)

    def __init__(self):
        super().__init__()
        self.bodies = []


def _collect(broker, queue=QUEUE):
    received = _Received()
    broker.consumer(queue, received).start()
    return received


def test_a_mandatory_message_no_queue_takes_is_refused(broker):
    with pytest.raises(UnroutableMessageError):
        broker.publish(OutgoingMessage("work", "nobody", b"x"))


def test_messages_route_like_rabbitmq(broker):
    received = _collect(broker)

    broker.publish(OutgoingMessage("work", "job", b"direct"))
    broker.publish(OutgoingMessage("t", "model.a.done", b"topic"))
    broker.publish(OutgoingMessage("", QUEUE, b"default"))
    broker.drain()

    assert received.bodies == [b"direct", b"topic", b"default"]
    assert received[0].user_id == "stub"


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.#", "a", True),
        ("#.c", "a.b.c", True),
        ("a.b", "a.c", False),
    ],
)
def test_topic_patterns(pattern, key, expected):
    assert topic_matches(pattern, key) is expected


def test_a_large_body_travels_as_chunks_and_arrives_whole(broker):
    received = _collect(broker)
    body = os.urandom(10 * 1024 + 5)

    broker.publish(OutgoingMessage("work", "job", body, message_id="m1", headers={"kind": "delta"}))
    assert len(broker.messages(QUEUE)) == 11
    broker.drain()

    assert len(received) == 1
    assert received.bodies == [body]
    assert received[0].message_id == "m1"
    assert dict(received[0].headers) == {"kind": "delta"}


def test_chunks_out_of_order_and_duplicated_arrive_once(broker):
    received = _collect(broker)
    body = os.urandom(4 * 1024)
    broker.publish(OutgoingMessage("work", "job", body))
    queue = broker.messages(QUEUE)
    chunks = list(queue)
    queue.clear()
    queue.extend([chunks[3], chunks[1], chunks[1], chunks[0], chunks[2], chunks[3]])

    broker.drain()

    assert received.bodies == [body]
    assert len(broker.messages(DLQ)) == 0


def test_a_transfer_missing_a_chunk_is_never_handed_over(broker):
    received = _collect(broker)
    broker.publish(OutgoingMessage("work", "job", os.urandom(4 * 1024)))
    del broker.messages(QUEUE)[2]

    broker.drain()

    assert received == []


def test_a_transfer_with_a_corrupted_chunk_is_dead_lettered_with_the_reason(broker):
    received = _collect(broker)
    broker.publish(OutgoingMessage("work", "job", os.urandom(4 * 1024)))
    queue = broker.messages(QUEUE)
    queue[1] = queue[1].__class__(**{**vars(queue[1]), "body": bytes(1024)})

    broker.drain()

    assert received == []
    [dead] = broker.messages(DLQ)
    assert "sha256" in dead.headers[REASON_HEADER]


def test_a_handler_that_always_fails_gets_its_message_dead_lettered_after_the_limit(broker):
    calls = []

    def failing(delivery):
        calls.append(delivery.attempts)
        raise RuntimeError("model exploded")

    broker.consumer(QUEUE, failing).start()
    broker.publish(OutgoingMessage("work", "job", b"task", message_id="t1"))

    broker.drain()

    assert calls == [1, 2, 3]
    [dead] = broker.messages(DLQ)
    assert dead.body == b"task"
    assert "failed 3 times" in dead.headers[REASON_HEADER]
    assert "model exploded" in dead.headers[REASON_HEADER]
    assert dead.headers[ORIGINAL_USER_HEADER] == "stub"
    assert dead.user_id is None
    assert len(broker.messages(QUEUE)) == 0


@pytest.mark.parametrize("error", [DecodeError("not msgpack"), PoisonMessageError("unknown worker")])
def test_an_undecodable_or_poison_message_is_dead_lettered_at_once(broker, error):
    calls = []

    def handler(delivery):
        calls.append(delivery)
        raise error

    broker.consumer(QUEUE, handler).start()
    broker.publish(OutgoingMessage("work", "job", b"\xc1garbage"))

    broker.drain()

    assert len(calls) == 1
    [dead] = broker.messages(DLQ)
    assert str(error) in dead.headers[REASON_HEADER]


def test_a_handler_that_fails_once_succeeds_on_the_retry(broker):
    outcomes = []

    def flaky(delivery):
        outcomes.append(delivery.attempts)
        if delivery.attempts == 1:
            raise ConnectionError("database blip")

    broker.consumer(QUEUE, flaky).start()
    broker.publish(OutgoingMessage("work", "job", b"task"))

    broker.drain()

    assert outcomes == [1, 2]
    assert len(broker.messages(DLQ)) == 0


def test_a_fanout_reaches_every_bound_queue(broker):
    broker.declare(Topology((), (QueueSpec("third", bindings=(Binding("news"),)),)))

    broker.publish(OutgoingMessage("news", "", b"v2"))

    assert len(broker.messages("other")) == 1
    assert len(broker.messages("third")) == 1


def test_a_stub_without_a_spill_dir_cleans_up_after_itself():
    stub = StubBroker()
    spill_dir = stub.config.spill_dir
    assert spill_dir is not None and spill_dir.exists()

    stub.close()

    assert not spill_dir.exists()


# -- batches ---------------------------------------------------------------------------------------


class _BatchRecorder:
    """A batch handler that fails the bodies in ``poison`` (dead-letter) or ``flaky`` (retry), and
    raises as a whole while ``broken`` is set; ``handler`` is its single-message counterpart."""

    def __init__(self, poison=(), flaky=(), broken=False):
        self.poison, self.flaky, self.broken = set(poison), set(flaky), broken
        self.batches: list[list[bytes]] = []
        self.singles: list[bytes] = []
        self.done: list[bytes] = []

    def _one(self, body):
        if body in self.poison:
            return PoisonMessageError(f"{body!r} is poison")
        if body in self.flaky:
            self.flaky.discard(body)
            return RuntimeError("try again")
        self.done.append(body)
        return None

    def batch(self, deliveries):
        bodies = [bytes(d.body) for d in deliveries]
        self.batches.append(bodies)
        if self.broken:
            raise RuntimeError("the transaction failed")
        return [self._one(b) for b in bodies]

    def handler(self, delivery):
        body = bytes(delivery.body)
        self.singles.append(body)
        if (error := self._one(body)) is not None:
            raise error


def test_a_batch_handler_gets_the_waiting_messages_together_and_each_gets_its_own_outcome(broker):
    recorder = _BatchRecorder(poison={b"m2"}, flaky={b"m4"})
    broker.consumer(QUEUE, recorder.handler, prefetch=8, batch_handler=recorder.batch, max_batch=8).start()
    for i in range(6):
        broker.publish(OutgoingMessage("work", "job", f"m{i}".encode()))

    broker.drain()

    assert recorder.batches[0] == [f"m{i}".encode() for i in range(6)]
    assert sorted(recorder.done) == [b"m0", b"m1", b"m3", b"m4", b"m5"]  # m4 on its second delivery
    assert recorder.done.count(b"m4") == 1
    (dead,) = broker.messages(DLQ)
    assert dead.body == b"m2" and "poison" in dead.headers[REASON_HEADER]


def test_a_batch_that_fails_as_a_whole_is_handled_one_message_at_a_time(broker):
    recorder = _BatchRecorder(poison={b"bad"}, broken=True)
    broker.consumer(QUEUE, recorder.handler, prefetch=4, batch_handler=recorder.batch, max_batch=4).start()
    for body in (b"a", b"bad", b"c"):
        broker.publish(OutgoingMessage("work", "job", body))

    broker.drain()

    assert recorder.batches == [[b"a", b"bad", b"c"]]
    assert recorder.singles == [b"a", b"bad", b"c"]
    assert recorder.done == [b"a", b"c"]
    assert [m.body for m in broker.messages(DLQ)] == [b"bad"]


def test_a_chunked_transfer_completes_inside_a_batch(broker):
    recorder = _BatchRecorder()
    broker.consumer(QUEUE, recorder.handler, prefetch=16, batch_handler=recorder.batch, max_batch=16).start()
    big = os.urandom(3000)  # three chunks of at most 1024 bytes
    broker.publish(OutgoingMessage("work", "job", b"small"))
    broker.publish(OutgoingMessage("work", "job", big))

    broker.drain()

    assert recorder.batches == [[b"small", big]]
    assert recorder.done == [b"small", big]
    assert not broker.messages(DLQ)
