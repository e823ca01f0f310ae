"""What a handler receives (:class:`Delivery`) and what the RabbitMQ layer adds to messages (headers).

A delivery is one logical message: a small body straight from RabbitMQ, or a large body reassembled
from chunks into a file (:attr:`Delivery.path`). Handlers that can stream use :meth:`Delivery.open`;
:attr:`Delivery.body` reads everything into memory.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

#: Why a message was dead-lettered by fedmq (the broker's own reason is in ``x-death``).
REASON_HEADER = "x-fedmq-reason"
#: The queue the message was taken from when it was dead-lettered.
ORIGINAL_QUEUE_HEADER = "x-fedmq-original-queue"
#: The authenticated ``user_id`` of a dead-lettered message (moved: only its sender may set user_id).
ORIGINAL_USER_HEADER = "x-fedmq-original-user-id"
#: How many times the consumer tried the message before dead-lettering it.
ATTEMPTS_HEADER = "x-fedmq-attempts"
#: Set by quorum queues on redeliveries: how many times the message was delivered before.
BROKER_DELIVERY_COUNT_HEADER = "x-delivery-count"


@dataclass(frozen=True)
class OutgoingMessage:
    """A message to publish; ``body`` larger than the chunk size is sent as chunks.

    ``tail_offset`` splits a chunked body's digest there (:mod:`common.broker.chunks`), so its
    receiver learns the verified sha256 of ``body[tail_offset:]`` (:attr:`Delivery.tail_sha256`)
    without hashing it again; ``tail_sha256`` is that digest when the sender knows it already.
    Both are ignored for a body sent whole.
    """

    exchange: str
    routing_key: str
    body: bytes | bytearray
    headers: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    type: str | None = None
    content_type: str = "application/msgpack"
    expiration_ms: int | None = None
    mandatory: bool = True
    persistent: bool = True
    tail_offset: int = 0
    tail_sha256: str | None = None


@dataclass(frozen=True)
class Delivery:
    """One message handed to a handler.

    ``user_id`` is the sender's RabbitMQ user as validated by the broker (``None`` when the sender
    did not set it). ``attempts`` is 1 on the first delivery. ``path`` is the reassembled file of a
    chunked body, ``data`` the body in memory (an ordinary message's, or a chunked body's that the
    reassembler also kept in memory); at least one is set. A reassembled file is deleted once the
    handler returns, so read or move what you need inside the handler. ``tail_sha256``, for a
    reassembled body only, is the sha256 of the body from ``tail_offset`` on, as the reassembler
    verified it (the whole body's when the sender did not split the digest).
    """

    queue: str
    exchange: str
    routing_key: str
    headers: Mapping[str, Any]
    size: int
    attempts: int = 1
    redelivered: bool = False
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    user_id: str | None = None
    type: str | None = None
    content_type: str | None = None
    data: bytes | bytearray | memoryview | None = None
    path: Path | None = None
    tail_offset: int = 0
    tail_sha256: str | None = None

    @property
    def verified_tail(self) -> tuple[int, str] | None:
        """``(offset, sha256 of the body from offset on)`` as the reassembler verified it, or ``None``
        (a body that came whole: nothing was hashed)."""
        return (self.tail_offset, self.tail_sha256) if self.tail_sha256 else None

    @property
    def body(self) -> bytes | bytearray | memoryview:
        """The whole body in memory (reads the reassembled file when it is not in memory)."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    def open(self) -> BinaryIO:
        """A binary stream over the body, without loading a reassembled file into memory."""
        if self.path is not None:
            return open(self.path, "rb")
        assert self.data is not None
        return io.BytesIO(self.data)
