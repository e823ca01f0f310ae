"""An in-memory :class:`~common.broker.base.Broker` for unit tests (dramatiq's StubBroker idea).

It routes like RabbitMQ (default exchange, direct, fanout and topic exchanges), refuses unroutable
mandatory messages, chunks large bodies with the same framing as the real publisher, and runs
consumers through the same :class:`~common.broker.processing.DeliveryProcessor`, so chunking, retry
and dead-letter behaviour are the real ones. Queues behave as quorum queues by default (the broker
counts deliveries in ``x-delivery-count`` and dead-letters past ``x-delivery-limit`` with reason
``delivery_limit``). Nothing runs in the background: :meth:`StubBroker.drain` delivers, in the
calling thread, until the consumed queues are empty. :meth:`StubBroker.messages` exposes a queue's
messages so tests can drop, duplicate, reorder or corrupt them.
"""

from __future__ import annotations

import logging
import tempfile
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.broker.base import Broker, MessageConsumer
from common.broker.chunks import Reassembler, split_body
from common.broker.config import BrokerConfig
from common.broker.message import BROKER_DELIVERY_COUNT_HEADER, OutgoingMessage
from common.broker.processing import (
    BatchHandler,
    DeliveryProcessor,
    Handler,
    Outcome,
    RawDelivery,
    dead_letter_headers,
)
from common.broker.topology import (
    DEAD_LETTER_EXCHANGE,
    DeclaredTopology,
    ExchangeType,
    QueueSpec,
    Topology,
    with_dead_letter_queues,
)
from common.errors import BrokerChannelClosedError, UnroutableMessageError

logger = logging.getLogger(__name__)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more words."""

    def match(words: list[str], keys: list[str]) -> bool:
        if not words:
            return not keys
        head, rest = words[0], words[1:]
        if head == "#":
            return any(match(rest, keys[i:]) for i in range(len(keys) + 1))
        return bool(keys) and head in ("*", keys[0]) and match(rest, keys[1:])

    return match(pattern.split("."), routing_key.split("."))


@dataclass
class _StubQueue:
    spec: QueueSpec
    messages: deque[RawDelivery] = field(default_factory=deque)
    consumer: StubConsumer | None = None


class StubConsumer(MessageConsumer):
    """A consumer registered with a :class:`StubBroker`; it receives messages in :meth:`StubBroker.drain`."""

    def __init__(self, broker: StubBroker, queue: str, processor: DeliveryProcessor, batch: int = 1) -> None:
        self.broker = broker
        self.queue = queue
        self.processor = processor
        self.batch = batch  # deliveries handed over at once, like RabbitMQ's prefetch window
        self.active = False

    def start(self) -> None:
        self.active = True

    def stop(self, timeout: float | None = 30.0) -> None:
        self.active = False


class StubBroker(Broker):
    """In-memory broker; ``user_id`` plays the authenticated user stamped on every message.

    Reassembled transfers go to ``spill_dir`` (else the config's, else a temp dir removed on close).
    """

    def __init__(
        self, config: BrokerConfig | None = None, spill_dir: Path | None = None, user_id: str = "stub"
    ):
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        config = config or BrokerConfig()
        if spill_dir is None and config.spill_dir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="fedmq-stub-")
            spill_dir = Path(self._tempdir.name)
        self.config = replace(config, spill_dir=spill_dir) if spill_dir is not None else config
        self.user_id = user_id
        self.exchanges: dict[str, ExchangeType] = {"": "direct"}
        self.bindings: dict[str, list[tuple[str, str]]] = {}
        self.queues: dict[str, _StubQueue] = {}

    def declare(self, topology: Topology) -> DeclaredTopology:
        full = with_dead_letter_queues(topology)
        for exchange in full.exchanges:
            self.exchanges.setdefault(exchange.name, exchange.type)
        declared = DeclaredTopology()
        for spec in full.queues:
            self.queues.setdefault(spec.name, _StubQueue(spec))
            for binding in spec.bindings:
                if binding.exchange not in self.exchanges:
                    raise BrokerChannelClosedError(f"no exchange {binding.exchange!r}", 404, "NOT_FOUND")
                pair = (spec.name, binding.routing_key)
                if pair not in self.bindings.setdefault(binding.exchange, []):
                    self.bindings[binding.exchange].append(pair)
            declared.kinds[spec.name] = "quorum"
        return declared

    def messages(self, queue: str) -> deque[RawDelivery]:
        """The messages waiting in ``queue`` (mutable: tests may edit it)."""
        return self.queues[queue].messages

    def _route(self, exchange: str, routing_key: str) -> list[str]:
        if exchange not in self.exchanges:
            raise BrokerChannelClosedError(f"no exchange {exchange!r}", 404, "NOT_FOUND")
        if exchange == "":
            return [routing_key] if routing_key in self.queues else []
        kind = self.exchanges[exchange]
        targets = []
        for queue, key in self.bindings.get(exchange, []):
            if (
                kind == "fanout"
                or (kind == "direct" and key == routing_key)
                or (kind == "topic" and topic_matches(key, routing_key))
            ):
                targets.append(queue)
        return targets

    def _put(self, exchange: str, routing_key: str, raw: RawDelivery, mandatory: bool) -> None:
        targets = self._route(exchange, routing_key)
        if not targets and mandatory:
            raise UnroutableMessageError(f"no queue is bound for {exchange!r} / {routing_key!r}")
        for queue in targets:
            self.queues[queue].messages.append(raw)

    def publish(self, message: OutgoingMessage) -> None:
        base = RawDelivery(
            body=bytes(message.body),
            exchange=message.exchange,
            routing_key=message.routing_key,
            headers=dict(message.headers),
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            user_id=self.user_id,
            type=message.type,
            content_type=message.content_type,
        )
        if len(message.body) <= self.config.chunk_size:
            self._put(message.exchange, message.routing_key, base, message.mandatory)
            return
        chunks = split_body(message.body, self.config.chunk_size, message.tail_offset, message.tail_sha256)
        for chunk, data in chunks:
            raw = replace(base, body=bytes(data), headers={**base.headers, **chunk.to_headers()})
            self._put(message.exchange, message.routing_key, raw, message.mandatory)

    def consumer(
        self,
        queue: str,
        handler: Handler,
        prefetch: int = 1,
        *,
        batch_handler: BatchHandler | None = None,
        max_batch: int = 1,
        durable_chunks: bool = True,
        memory_budget: int = 0,
    ) -> StubConsumer:
        if queue not in self.queues:
            raise BrokerChannelClosedError(f"no queue {queue!r}", 404, "NOT_FOUND")
        reassembler = Reassembler(
            self.config.transfers_dir(queue),
            self.config.max_transfer_size,
            fsync=False,
            memory_budget=memory_budget,
        )
        processor = DeliveryProcessor(
            queue, handler, reassembler, self.config.max_delivery_attempts, batch_handler=batch_handler
        )
        consumer = StubConsumer(self, queue, processor, max(1, min(prefetch, max_batch)))
        self.queues[queue].consumer = consumer
        return consumer

    def _dead_letter(self, queue: str, raw: RawDelivery, headers: dict[str, Any]) -> None:
        copy = replace(raw, headers=headers, user_id=None, exchange=DEAD_LETTER_EXCHANGE, routing_key=queue)
        if not self._route(DEAD_LETTER_EXCHANGE, queue):
            logger.error("stub: dead-letter of %s has no queue; dropped", queue)
        self._put(DEAD_LETTER_EXCHANGE, queue, copy, mandatory=False)

    def _deliver_batch(self, stub_queue: _StubQueue, consumer: StubConsumer) -> int:
        """Hand up to ``consumer.batch`` messages to the consumer at once; return how many left the queue."""
        spec = stub_queue.spec
        taken: list[RawDelivery] = []
        popped = 0
        while stub_queue.messages and len(taken) < consumer.batch:
            raw = stub_queue.messages.popleft()
            popped += 1
            count = raw.headers.get(BROKER_DELIVERY_COUNT_HEADER, 0)
            if spec.quorum and spec.delivery_limit is not None and count > spec.delivery_limit:
                headers = {**raw.headers, "x-death": [{"reason": "delivery_limit", "queue": spec.name}]}
                self._dead_letter(spec.name, raw, headers)
                continue
            taken.append(raw)
        retries: list[RawDelivery] = []
        for raw, decision in zip(taken, consumer.processor.process_batch(taken), strict=True):
            if decision.outcome is Outcome.RETRY:
                count = raw.headers.get(BROKER_DELIVERY_COUNT_HEADER, 0)
                headers = {**raw.headers, BROKER_DELIVERY_COUNT_HEADER: count + 1}
                retries.append(replace(raw, headers=headers, redelivered=True))
            elif decision.outcome is Outcome.DEAD_LETTER:
                self._dead_letter(spec.name, raw, dead_letter_headers(raw, spec.name, decision))
        stub_queue.messages.extendleft(reversed(retries))
        return popped

    def drain(self, *queues: str, max_deliveries: int = 100_000) -> int:
        """Deliver to active consumers until their queues (all, or ``queues``) are empty; return how many."""
        delivered = 0
        names = queues or tuple(self.queues)
        while delivered < max_deliveries:
            ready = [
                q
                for name in names
                if (q := self.queues[name]).messages and q.consumer is not None and q.consumer.active
            ]
            if not ready:
                break
            for stub_queue in ready:
                assert stub_queue.consumer is not None
                delivered += self._deliver_batch(stub_queue, stub_queue.consumer)
        return delivered

    def close(self) -> None:
        for stub_queue in self.queues.values():
            if stub_queue.consumer is not None:
                stub_queue.consumer.stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()
