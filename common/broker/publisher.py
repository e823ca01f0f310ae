"""Publishing with publisher confirms and ``mandatory``; large bodies go out as chunks.

:meth:`Publisher.publish` returns only once RabbitMQ has confirmed every chunk of the message
(persistent messages on durable queues are then on disk). An unroutable message raises
:class:`~common.errors.UnroutableMessageError` instead of vanishing; a negative confirm raises
:class:`~common.errors.MessageNackedError`. A lost connection is reopened with capped backoff and
the unconfirmed part is published again (so a consumer may see a chunk twice: the reassembler and
idempotent handlers make that harmless).

Every message carries ``user_id`` = the connection's user, which RabbitMQ validates, so receivers can
trust it. A publisher owns one connection and is used by one thread at a time.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from common.broker.chunks import split_body
from common.broker.config import BrokerConfig
from common.broker.connection import backoff_delays, close_quietly, connect, url_username
from common.broker.errors import translating_pika_errors
from common.broker.message import OutgoingMessage
from common.errors import BrokerUnreachableError
from common.faults import fault_point

logger = logging.getLogger(__name__)


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

    def _ensure_channel(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        close_quietly(self._connection)
        self._connection = connect(self.config, self.name)
        with translating_pika_errors():
            channel = self._connection.channel()
            channel.confirm_delivery()
        self._channel = channel
        return channel

    def _publish_one(
        self, message: OutgoingMessage, body: bytes | bytearray | memoryview, headers: dict[str, Any]
    ) -> None:
        properties = message_properties(message, self._user, headers)
        delays = backoff_delays(self.config.reconnect_initial_s, self.config.reconnect_max_s)
        started = time.monotonic()
        while True:
            try:
                channel = self._ensure_channel()
                with translating_pika_errors():
                    channel.basic_publish(
                        message.exchange,
                        message.routing_key,
                        bytes(body),
                        properties=properties,
                        mandatory=message.mandatory,
                    )
                return
            except BrokerUnreachableError as exc:
                self._channel = None
                delay = next(delays)
                if time.monotonic() - started + delay > self.retry_deadline_s:
                    raise
                logger.warning("%s: publish failed (%s); reconnecting in %.1f s", self.name, exc, delay)
                time.sleep(delay)
            except Exception:
                # The channel of a refused publish is closed or in an unknown state: start afresh.
                self._reset_if_closed()
                raise

    def _reset_if_closed(self) -> None:
        if self._channel is not None and not self._channel.is_open:
            self._channel = None

    def publish(self, message: OutgoingMessage) -> None:
        """Publish ``message`` (as chunks when larger than the chunk size); return once confirmed."""
        headers = dict(message.headers)
        if len(message.body) <= self.config.chunk_size:
            self._publish_one(message, message.body, headers)
            return
        for chunk, data in split_body(message.body, self.config.chunk_size):
            self._publish_one(message, data, {**headers, **chunk.to_headers()})
            fault_point(f"publish-after-chunk-{chunk.index}")  # confirmed; the next not yet sent
        logger.debug("%s: sent %d bytes as chunks to %s", self.name, len(message.body), message.routing_key)

    def close(self) -> None:
        close_quietly(self._connection)
        self._connection = None
        self._channel = None

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
