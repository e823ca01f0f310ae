"""Consuming a queue: prefetch, the handler on a worker thread, acks back on pika's I/O thread.

:class:`Consumer` owns one connection. Its I/O thread (the one calling :meth:`Consumer.run`) only
moves frames: it keeps heartbeats flowing however long a handler runs. Deliveries go to one worker
thread (in batches, with a batch handler) that runs :class:`~common.broker.processing.DeliveryProcessor` (reassembly, handler, retry
rules); the worker hands each decision back with ``add_callback_threadsafe`` and the I/O thread
settles it:

- ``ACK``: ``basic_ack`` — only after the handler returned, so a message in hand when the process or
  its connection dies is redelivered;
- ``RETRY``: ``basic_nack(requeue=True)``;
- ``DEAD_LETTER``: a copy goes to the dead-letter exchange (routing key = the queue) with the reason
  in ``x-fedmq-reason``, confirmed, and then the original is acked. If that publish fails the
  original is rejected without requeue, so the broker dead-letters it (reason in ``x-death``):
  that is what happens for a user without write permission on the dead-letter exchange.

A lost connection is reopened with capped backoff; decisions about deliveries of the old connection
are dropped (RabbitMQ redelivers those messages). A consumer the broker cancels (its queue was
deleted) consumes again after a backoff; a queue that no longer exists, or a refusal (403), stops
:meth:`Consumer.run` with the error.
"""

from __future__ import annotations

import functools
import logging
import queue as queue_module
import threading
from dataclasses import dataclass

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from common.broker.chunks import Reassembler
from common.broker.config import BrokerConfig
from common.broker.connection import backoff_delays, close_quietly, connect_with_retry
from common.broker.errors import translating_pika_errors
from common.broker.processing import (
    BatchHandler,
    Decision,
    DeliveryProcessor,
    Handler,
    Outcome,
    RawDelivery,
    dead_letter_headers,
)
from common.broker.topology import DEAD_LETTER_EXCHANGE
from common.errors import BrokerChannelClosedError, BrokerError, BrokerUnreachableError

logger = logging.getLogger(__name__)

_POLL_S = 0.25


@dataclass(frozen=True)
class _Work:
    generation: int
    connection: pika.BlockingConnection
    delivery_tag: int
    raw: RawDelivery


def raw_delivery(method: Basic.Deliver, properties: BasicProperties, body: bytes) -> RawDelivery:
    """Our view of a pika delivery."""
    return RawDelivery(
        body=body,
        exchange=method.exchange or "",
        routing_key=method.routing_key or "",
        headers=dict(properties.headers or {}),
        redelivered=bool(method.redelivered),
        message_id=properties.message_id,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        user_id=properties.user_id,
        type=properties.type,
        content_type=properties.content_type,
    )


class Consumer:
    """Consumes ``queue`` with ``handler`` until :meth:`stop`; see the module docstring.

    ``prefetch`` is how many unacked messages RabbitMQ may push ahead (1 for training tasks; a
    window of a few chunks for large transfers). Up to ``max_batch`` deliveries already received
    (and at most about ``max_batch_bytes`` of bodies) are processed and settled together, after
    the handler returned: the chunks among them are made durable with one fsync per transfer,
    and with a ``batch_handler`` the complete messages are handled together (see
    :class:`~common.broker.processing.DeliveryProcessor`).
    """

    def __init__(
        self,
        config: BrokerConfig,
        queue: str,
        handler: Handler,
        prefetch: int = 1,
        name: str | None = None,
        reassembler: Reassembler | None = None,
        batch_handler: BatchHandler | None = None,
        max_batch: int = 1,
        max_batch_bytes: int = 16 << 20,
    ) -> None:
        self.config = config
        self.queue = queue
        self.prefetch = prefetch
        self.max_batch = max(1, max_batch)
        self.max_batch_bytes = max_batch_bytes
        self.name = name or f"fedmq-consumer-{queue}"
        reassembler = reassembler or Reassembler(config.transfers_dir(queue), config.max_transfer_size)
        self.processor = DeliveryProcessor(
            queue, handler, reassembler, config.max_delivery_attempts, batch_handler=batch_handler
        )
        self.connections_opened = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._generation = 0
        self._work: queue_module.Queue[_Work | None] = queue_module.Queue()
        self._settled: list[list[tuple[_Work, Decision]]] = []  # one entry per batch, in order
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._dead_letters: BlockingChannel | None = None

    # -- worker thread -------------------------------------------------------------------------

    def _next_batch(self) -> list[_Work] | None:
        """The next delivery plus, up to ``max_batch``, those already waiting behind it (None: stop)."""
        work = self._work.get()
        if work is None:
            return None
        batch, size = [work], len(work.raw.body)
        while len(batch) < self.max_batch and size < self.max_batch_bytes:
            try:
                more = self._work.get_nowait()
            except queue_module.Empty:
                break
            if more is None:
                self._work.put(None)  # stop after this batch
                break
            batch.append(more)
            size += len(more.raw.body)
        return batch

    def _worker(self) -> None:
        while (batch := self._next_batch()) is not None:
            # Deliveries of an older connection are never settled: RabbitMQ gives them back.
            live = [w for w in batch if not self._stop.is_set() and w.generation == self._generation]
            if not live:
                continue
            self._idle.clear()
            try:
                try:
                    decisions = self.processor.process_batch([w.raw for w in live])
                except Exception as exc:  # a bug or a full disk: let the messages come back later
                    logger.exception("%s: processing failed", self.name)
                    decisions = [Decision(Outcome.RETRY, f"{type(exc).__name__}: {exc}")] * len(live)
                settled = list(zip(live, decisions, strict=True))
                try:
                    with translating_pika_errors():
                        live[0].connection.add_callback_threadsafe(
                            functools.partial(self._settled.append, settled)
                        )
                except BrokerError:
                    logger.info(
                        "%s: connection gone before settling; messages will be redelivered", self.name
                    )
            finally:
                self._idle.set()

    # -- I/O thread ----------------------------------------------------------------------------

    def _settle(self, channel: BlockingChannel) -> None:
        batches, self._settled = self._settled, []
        for batch in batches:
            live = [(work, decision) for work, decision in batch if work.generation == self._generation]
            if len(live) > 1 and all(decision.outcome is Outcome.ACK for _, decision in live):
                # Batches are settled in delivery order, so every earlier delivery of this channel
                # is settled already: one ack with ``multiple`` covers exactly this batch.
                with translating_pika_errors():
                    channel.basic_ack(live[-1][0].delivery_tag, multiple=True)
                continue
            for work, decision in live:
                self._settle_one(channel, work, decision)

    def _settle_one(self, channel: BlockingChannel, work: _Work, decision: Decision) -> None:
        with translating_pika_errors():
            if decision.outcome is Outcome.ACK:
                channel.basic_ack(work.delivery_tag)
            elif decision.outcome is Outcome.RETRY:
                channel.basic_nack(work.delivery_tag, requeue=True)
        if decision.outcome is Outcome.DEAD_LETTER:
            self._dead_letter(channel, work, decision)

    def _dead_letter_channel(self, channel: BlockingChannel) -> BlockingChannel:
        """A confirm-mode channel beside ``channel`` (reopened after the broker closed it, e.g. 403)."""
        if self._dead_letters is None or not self._dead_letters.is_open:
            with translating_pika_errors():
                self._dead_letters = channel.connection.channel()
                self._dead_letters.confirm_delivery()
        return self._dead_letters

    def _dead_letter(self, channel: BlockingChannel, work: _Work, decision: Decision) -> None:
        raw = work.raw
        properties = BasicProperties(
            content_type=raw.content_type,
            delivery_mode=pika.DeliveryMode.Persistent,
            headers=dead_letter_headers(raw, self.queue, decision),
            message_id=raw.message_id,
            correlation_id=raw.correlation_id,
            reply_to=raw.reply_to,
            type=raw.type,
        )
        try:
            dead_letters = self._dead_letter_channel(channel)
            with translating_pika_errors():
                dead_letters.basic_publish(
                    DEAD_LETTER_EXCHANGE, self.queue, raw.body, properties, mandatory=True
                )
        except BrokerUnreachableError:
            raise
        except BrokerError as exc:
            logger.error("%s: cannot dead-letter with a reason (%s); rejecting it instead", self.name, exc)
            with translating_pika_errors():
                channel.basic_reject(work.delivery_tag, requeue=False)
            return
        logger.warning("%s: dead-lettered message %s: %s", self.name, raw.message_id, decision.reason)
        with translating_pika_errors():
            channel.basic_ack(work.delivery_tag)

    def _consume_once(self, connection: pika.BlockingConnection) -> None:
        generation = self._generation

        def on_message(
            _channel: BlockingChannel, method: Basic.Deliver, properties: BasicProperties, body: bytes
        ) -> None:
            self._work.put(
                _Work(generation, connection, method.delivery_tag, raw_delivery(method, properties, body))
            )

        with translating_pika_errors():
            channel = connection.channel()
            channel.basic_qos(prefetch_count=self.prefetch)
            self._dead_letters = None
            tag = channel.basic_consume(self.queue, on_message)
        logger.info("%s: consuming %s (prefetch %d)", self.name, self.queue, self.prefetch)
        while not self._stop.is_set():
            with translating_pika_errors():
                connection.process_data_events(time_limit=_POLL_S)
            self._settle(channel)
            if tag not in channel.consumer_tags:
                raise BrokerChannelClosedError(f"RabbitMQ cancelled the consumer of {self.queue}")
        with translating_pika_errors():
            channel.basic_cancel(tag)
            while not self._idle.wait(0) or self._settled:
                connection.process_data_events(time_limit=_POLL_S)
                self._settle(channel)

    def run(self) -> None:
        """Consume until :meth:`stop`, reconnecting on a lost connection; raise refusals."""
        worker = threading.Thread(target=self._worker, name=f"{self.name}-worker", daemon=True)
        worker.start()
        delays = backoff_delays(self.config.reconnect_initial_s, self.config.reconnect_max_s)
        try:
            while not self._stop.is_set():
                connection = connect_with_retry(self.config, self.name, stop=self._stop)
                if connection is None:
                    break
                self._generation += 1
                self.connections_opened += 1
                try:
                    self._consume_once(connection)
                except BrokerUnreachableError as exc:
                    logger.warning("%s: connection lost (%s); reconnecting", self.name, exc)
                except BrokerChannelClosedError as exc:
                    if exc.reply_code in (403, 404):
                        raise
                    logger.warning("%s: channel closed (%s); reopening", self.name, exc)
                    self._stop.wait(next(delays))
                finally:
                    self._generation += 1  # decisions about this connection's deliveries are void
                    close_quietly(connection)
        finally:
            self._work.put(None)
            worker.join()

    def start(self) -> threading.Thread:
        """Run in a background thread; a fatal error is kept in :attr:`error`."""

        def target() -> None:
            try:
                self.run()
            except BaseException as exc:
                self.error = exc
                logger.exception("%s: stopped by an error", self.name)

        self._thread = threading.Thread(target=target, name=self.name, daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop consuming; waits for the handler in progress to finish and its message to be settled."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
