"""Publishing with publisher confirms and ``mandatory``; large bodies go out as chunks.

:meth:`Publisher.publish` returns only once RabbitMQ has confirmed every chunk of the message
(persistent messages on durable queues are then on disk). An unroutable message raises
:class:`~common.errors.UnroutableMessageError` instead of vanishing; a negative confirm raises
:class:`~common.errors.MessageNackedError`. A lost connection is reopened with capped backoff and
the unconfirmed part is published again (so a consumer may see a chunk twice: the reassembler and
idempotent handlers make that harmless).

Chunks go out with up to :data:`CHUNK_WINDOW` of them unconfirmed at once, on a second channel of
the same connection: RabbitMQ stores (and fsyncs) what is in flight together, where waiting for
each chunk's confirm before sending the next made a 100 MB body 25 round trips and 25 disk syncs
(pika's BlockingChannel waits for each confirm, so this channel's confirms are tracked here, on
pika's underlying channel object).

Every message carries ``user_id`` = the connection's user, which RabbitMQ validates, so receivers can
trust it. A publisher owns one connection and is used by one thread at a time; between publishes,
a process-wide keeper thread lets the idle connection exchange its heartbeats
(:meth:`Publisher.keep_alive`), so the broker does not drop it between rounds.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from common.broker.chunks import split_body
from common.broker.config import BrokerConfig
from common.broker.connection import backoff_delays, close_quietly, connect, url_username
from common.broker.errors import translating_pika_errors
from common.broker.message import OutgoingMessage
from common.errors import BrokerUnreachableError, MessageNackedError, UnroutableMessageError
from common.faults import armed, fault_point

logger = logging.getLogger(__name__)

CHUNK_WINDOW = 8  # chunks of one body in flight (unconfirmed) at once: 32 MiB at the default size
KEEPER_TICK_S = 1.0  # how often the keeper looks at idle publishers (heartbeats of 4 s and more)


class _Keeper:
    """One daemon thread per process that lets idle publishers' connections exchange heartbeats
    (:meth:`Publisher.keep_alive`); started with the first publisher, it holds them weakly."""

    def __init__(self) -> None:
        self._publishers: weakref.WeakSet[Publisher] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, publisher: Publisher) -> None:
        with self._lock:
            self._publishers.add(publisher)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fedmq-publisher-keeper", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(KEEPER_TICK_S)
            with self._lock:
                publishers = list(self._publishers)
            for publisher in publishers:
                try:
                    publisher.keep_alive()
                except Exception:  # never let one publisher stop the others' heartbeats
                    logger.exception("keeping %s's connection alive failed", publisher.name)


_KEEPER = _Keeper()


def message_properties(message: OutgoingMessage, user_id: str | None, headers: dict[str, Any]) -> Any:
    """pika properties of ``message`` (persistent unless asked otherwise)."""
    return pika.BasicProperties(
        content_type=message.content_type,
        delivery_mode=pika.DeliveryMode.Persistent if message.persistent else pika.DeliveryMode.Transient,
        headers=headers,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        type=message.type,
        user_id=user_id,
        expiration=str(message.expiration_ms) if message.expiration_ms is not None else None,
        timestamp=int(time.time()),
    )


class Publisher:
    """Publishes confirmed messages over its own connection (opened on first use).

    ``retry_deadline_s`` bounds how long one publish keeps retrying an unreachable broker.
    """

    def __init__(self, config: BrokerConfig, name: str = "fedmq-publisher", retry_deadline_s: float = 60.0):
        self.config = config
        self.name = name
        self.retry_deadline_s = retry_deadline_s
        self._user = url_username(config)
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._chunks: _WindowedChannel | None = None
        self._last_used = 0.0  # time.monotonic() of the connection's last use
        # publish() and close() hold it; the keeper (below) only takes it when nothing else does
        self._lock = threading.RLock()
        _KEEPER.add(self)

    def _ensure_channel(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        close_quietly(self._connection)
        self._channel = self._chunks = None
        self._connection = connect(self.config, self.name)
        with translating_pika_errors():
            channel = self._connection.channel()
            channel.confirm_delivery()
        self._channel = channel
        self._last_used = time.monotonic()
        return channel

    def keep_alive(self) -> None:
        """Let an idle connection exchange its heartbeats (the keeper calls this about every second).

        A BlockingConnection sends and checks heartbeats only while it is used: a publisher left
        idle between rounds longer than the heartbeat timeout had its connection dropped by the
        broker, and its next publish found it reset (pika logging errors, a warning and a
        reconnect here). Does nothing while a publish or close holds the publisher.
        """
        heartbeat = self.config.heartbeat_s
        if heartbeat <= 0 or not self._lock.acquire(blocking=False):
            return
        try:
            connection = self._connection
            if connection is None or not connection.is_open:
                return
            if time.monotonic() - self._last_used < heartbeat / 4:
                return
            try:
                with translating_pika_errors():
                    connection.process_data_events(time_limit=0)
                self._last_used = time.monotonic()
            except Exception as exc:  # lost meanwhile: the next publish opens a new connection
                logger.info("%s: idle connection lost (%s); reopened on the next publish", self.name, exc)
                self._channel = self._chunks = None
        finally:
            self._lock.release()

    def _publish_one(
        self, message: OutgoingMessage, body: bytes | bytearray | memoryview, headers: dict[str, Any]
    ) -> None:
        properties = message_properties(message, self._user, headers)

        def send() -> None:
            self._ensure_channel().basic_publish(
                message.exchange,
                message.routing_key,
                bytes(body),
                properties=properties,
                mandatory=message.mandatory,
            )

        self._with_reconnect(send, "publish")

    def _with_reconnect(self, send: Callable[[], None], what: str) -> None:
        """Run ``send`` until it succeeds, reconnecting with capped backoff while the broker is
        unreachable (for at most ``retry_deadline_s``); other errors are raised at once."""
        delays = backoff_delays(self.config.reconnect_initial_s, self.config.reconnect_max_s)
        started = time.monotonic()
        while True:
            try:
                with translating_pika_errors():
                    send()
                self._last_used = time.monotonic()
                return
            except BrokerUnreachableError as exc:
                self._channel = self._chunks = None
                delay = next(delays)
                if time.monotonic() - started + delay > self.retry_deadline_s:
                    raise
                logger.warning("%s: %s failed (%s); reconnecting in %.1f s", self.name, what, exc, delay)
                time.sleep(delay)
            except Exception:
                # The channel of a refused publish is closed or in an unknown state: start afresh.
                self._reset_if_closed()
                raise

    def _reset_if_closed(self) -> None:
        if self._channel is not None and not self._channel.is_open:
            self._channel = None
        if self._chunks is not None and not self._chunks.is_open:
            self._chunks = None

    def _ensure_chunk_channel(self) -> _WindowedChannel:
        self._ensure_channel()
        if self._chunks is not None and self._chunks.is_open:
            return self._chunks
        assert self._connection is not None
        with translating_pika_errors():
            self._chunks = _WindowedChannel(self._connection)
        return self._chunks

    def publish(self, message: OutgoingMessage) -> None:
        """Publish ``message`` (as chunks when larger than the chunk size); return once confirmed."""
        with self._lock:
            self._publish(message)

    def _publish(self, message: OutgoingMessage) -> None:
        headers = dict(message.headers)
        if len(message.body) <= self.config.chunk_size:
            self._publish_one(message, message.body, headers)
            return
        todo = [
            (chunk.index, data, message_properties(message, self._user, {**headers, **chunk.to_headers()}))
            for chunk, data in split_body(
                message.body, self.config.chunk_size, message.tail_offset, message.tail_sha256
            )
        ]
        # todo keeps the chunks not confirmed yet: a retry after a lost connection sends only those
        self._with_reconnect(
            lambda: self._ensure_chunk_channel().publish_all(message, todo), "chunked publish"
        )
        logger.debug("%s: sent %d bytes as chunks to %s", self.name, len(message.body), message.routing_key)

    def close(self) -> None:
        with self._lock:
            close_quietly(self._connection)
            self._connection = None
            self._channel = None
            self._chunks = None

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_Chunk = tuple[int, Any, Any]  # (index, data, pika properties)


class _WindowedChannel:
    """A confirm-mode channel whose publishes do not wait for their confirms one by one.

    Confirms (acks carry the highest delivery tag, ``multiple`` for all before it) and returns of
    ``mandatory`` publishes are recorded by callbacks on pika's underlying channel, which run while
    the blocking connection processes I/O.
    """

    def __init__(self, connection: pika.BlockingConnection) -> None:
        self._connection = connection
        self._blocking = connection.channel()
        self._impl = self._blocking._impl  # pika's async Channel under the blocking wrapper
        self._next_tag = 1
        self._confirmed: set[int] = set()
        self._nacked: set[int] = set()
        self._returned = False
        self._inflight: dict[int, _Chunk] = {}
        ready: list[object] = []

        def on_select_ok(frame: object) -> None:
            ready.append(frame)
            self._wake()

        self._impl.add_on_return_callback(self._on_return)
        self._impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=on_select_ok)
        while not ready:
            connection.process_data_events(time_limit=1.0)  # returns early once woken

    @property
    def is_open(self) -> bool:
        return bool(self._blocking.is_open and self._connection.is_open)

    def _on_return(self, *_args: object) -> None:
        self._returned = True  # RabbitMQ sends basic.return before the ack of that message
        self._wake()

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tags = (
            range(self._lowest_unsettled(), method.delivery_tag + 1)
            if method.multiple
            else [method.delivery_tag]
        )
        target = self._nacked if isinstance(method, pika.spec.Basic.Nack) else self._confirmed
        target.update(tags)
        self._wake()

    def _wake(self) -> None:
        """End the running ``process_data_events``: callbacks of the underlying channel do not."""
        self._connection.add_callback_threadsafe(_nothing)

    def _lowest_unsettled(self) -> int:
        return min(self._inflight, default=self._next_tag)

    def publish_all(self, message: OutgoingMessage, todo: list[_Chunk]) -> None:
        """Publish ``todo``'s chunks, at most :data:`CHUNK_WINDOW` unconfirmed; each confirmed one
        is removed from ``todo`` (what is left after an error is what must be sent again)."""
        pending = list(reversed(todo))
        self._inflight = {}
        # a crash test's "chunk N confirmed, the next not sent": one chunk at a time
        window = 1 if armed("publish-after-chunk-") else CHUNK_WINDOW
        while pending or self._inflight:
            while pending and len(self._inflight) < window:
                item = pending.pop()
                self._impl.basic_publish(
                    message.exchange,
                    message.routing_key,
                    bytes(item[1]),
                    properties=item[2],
                    mandatory=message.mandatory,
                )
                self._inflight[self._next_tag] = item
                self._next_tag += 1
            self._connection.process_data_events(time_limit=1.0)  # returns early once woken
            self._settle(todo)

    def _settle(self, todo: list[_Chunk]) -> None:
        if self._returned:
            raise UnroutableMessageError("no queue is bound for a chunk of the message")
        if any(tag in self._inflight for tag in self._nacked):
            raise MessageNackedError("RabbitMQ refused a chunk of the message")
        for tag in sorted(t for t in self._inflight if t in self._confirmed):
            item = self._inflight.pop(tag)
            self._confirmed.discard(tag)
            for i, other in enumerate(todo):  # by identity: comparing chunks would compare their bytes
                if other is item:
                    del todo[i]
                    break
            fault_point(f"publish-after-chunk-{item[0]}")  # confirmed; later chunks may be in flight


def _nothing() -> None:
    pass
