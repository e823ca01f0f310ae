"""What happens to one delivery, decided the same way by the RabbitMQ consumer and the stub broker.

:class:`DeliveryProcessor` turns a raw delivery into a :class:`Decision` — ack it, give it back for
another attempt, or dead-letter it with a reason — and never raises. It reassembles chunks, calls
the handler and classifies its outcome:

- the handler returns: ack (after it returned, never before);
- it raises :class:`~common.errors.DecodeError` or :class:`~common.errors.PoisonMessageError`: the
  message can never succeed, dead-letter it now;
- it raises anything else: retry, until the message has been tried ``max_attempts`` times, then
  dead-letter it with the last error as the reason.

Attempts come from the broker's ``x-delivery-count`` on quorum queues (which also counts deliveries
to consumers that crashed); on classic queues the processor counts failures itself, per message,
for as long as it lives. Transfers that stopped receiving chunks are dropped, at most once a
minute, after the reassembler's ``stale_after_s``.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.broker.chunks import ChunkHeader, Reassembler, strip_chunk_headers
from common.broker.message import (
    ATTEMPTS_HEADER,
    BROKER_DELIVERY_COUNT_HEADER,
    ORIGINAL_QUEUE_HEADER,
    ORIGINAL_USER_HEADER,
    REASON_HEADER,
    Delivery,
)
from common.errors import DecodeError, PoisonMessageError

logger = logging.getLogger(__name__)

Handler = Callable[[Delivery], None]
_MAX_TRACKED = 10_000
_EXPIRY_INTERVAL_S = 60.0


class Outcome(enum.Enum):
    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead-letter"


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str = ""
    attempts: int = 1


@dataclass(frozen=True)
class RawDelivery:
    """A message as the transport got it (one chunk of a transfer, or a whole small message)."""

    body: bytes
    exchange: str = ""
    routing_key: str = ""
    headers: Mapping[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    user_id: str | None = None
    type: str | None = None
    content_type: str | None = None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


class DeliveryProcessor:
    """Runs ``handler`` on the deliveries of ``queue``; see the module docstring for the rules."""

    def __init__(self, queue: str, handler: Handler, reassembler: Reassembler, max_attempts: int) -> None:
        self.queue = queue
        self.handler = handler
        self.reassembler = reassembler
        self.max_attempts = max_attempts
        self._failures: OrderedDict[str, int] = OrderedDict()
        self._next_expiry = 0.0

    def _expire_stale_transfers(self) -> None:
        """Drop transfers that lost a chunk, at most once a minute (the reassembler logs each)."""
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + _EXPIRY_INTERVAL_S
            self.reassembler.expire()

    def _key(self, raw: RawDelivery, chunk: ChunkHeader | None) -> str:
        if chunk is not None:
            return f"{chunk.transfer_id}:{chunk.index}"
        if raw.message_id:
            return f"id:{raw.message_id}"
        return "sha:" + hashlib.sha256(raw.body).hexdigest()

    def _attempts(self, raw: RawDelivery, key: str) -> int:
        counted = raw.headers.get(BROKER_DELIVERY_COUNT_HEADER)
        if isinstance(counted, int):
            return counted + 1
        return self._failures.get(key, 0) + 1

    def _record_failure(self, key: str, attempts: int) -> None:
        self._failures[key] = attempts
        self._failures.move_to_end(key)
        while len(self._failures) > _MAX_TRACKED:
            self._failures.popitem(last=False)

    def process(self, raw: RawDelivery) -> Decision:
        """Decide what to do with ``raw``; the handler runs here, in the caller's thread."""
        self._expire_stale_transfers()
        try:
            chunk = ChunkHeader.from_headers(raw.headers)
        except DecodeError as exc:
            return Decision(Outcome.DEAD_LETTER, _describe(exc))
        key = self._key(raw, chunk)
        attempts = self._attempts(raw, key)
        handled_transfer: str | None = None
        try:
            delivery = self._delivery(raw, chunk, attempts)
            if delivery is None:
                return Decision(Outcome.ACK, attempts=attempts)
            handled_transfer = chunk.transfer_id if chunk is not None else None
            decision = self._run_handler(delivery, attempts)
        except DecodeError as exc:  # a chunk that cannot belong to a good transfer
            logger.warning("queue %s: rejecting chunk: %s", self.queue, exc)
            return Decision(Outcome.DEAD_LETTER, _describe(exc), attempts)
        except Exception as exc:  # a full disk or a bug here: counted like a handler failure
            decision = self._failure(exc, attempts, raw.message_id)
        if decision.outcome is Outcome.RETRY:
            self._record_failure(key, attempts)
        else:
            self._failures.pop(key, None)
            if handled_transfer is not None:
                self.reassembler.finish(handled_transfer)
        return decision

    def _delivery(self, raw: RawDelivery, chunk: ChunkHeader | None, attempts: int) -> Delivery | None:
        """The delivery for the handler, or ``None`` while a transfer still misses chunks."""
        body: dict[str, Any]
        if chunk is None:
            body = {"data": raw.body, "size": len(raw.body)}
        else:
            completed = self.reassembler.add(chunk, raw.body, raw.user_id)
            if completed is None:
                return None
            body = {"path": completed.path, "size": completed.size}
        return Delivery(
            queue=self.queue,
            exchange=raw.exchange,
            routing_key=raw.routing_key,
            headers=strip_chunk_headers(raw.headers),
            attempts=attempts,
            redelivered=raw.redelivered,
            message_id=raw.message_id,
            correlation_id=raw.correlation_id,
            reply_to=raw.reply_to,
            user_id=raw.user_id,
            type=raw.type,
            content_type=raw.content_type,
            **body,
        )

    def _run_handler(self, delivery: Delivery, attempts: int) -> Decision:
        try:
            self.handler(delivery)
        except (DecodeError, PoisonMessageError) as exc:
            logger.warning("queue %s: message %s is poison: %s", self.queue, delivery.message_id, exc)
            return Decision(Outcome.DEAD_LETTER, _describe(exc), attempts)
        except Exception as exc:
            return self._failure(exc, attempts, delivery.message_id)
        return Decision(Outcome.ACK, attempts=attempts)

    def _failure(self, exc: Exception, attempts: int, message_id: str | None) -> Decision:
        """Retry, or dead-letter once the message has had ``max_attempts``."""
        if attempts >= self.max_attempts:
            logger.error(
                "queue %s: message %s failed %d times, dead-lettering it: %s",
                self.queue,
                message_id,
                attempts,
                _describe(exc),
            )
            return Decision(Outcome.DEAD_LETTER, f"failed {attempts} times: {_describe(exc)}", attempts)
        logger.warning(
            "queue %s: message %s failed (attempt %d of %d): %s",
            self.queue,
            message_id,
            attempts,
            self.max_attempts,
            _describe(exc),
            exc_info=True,
        )
        return Decision(Outcome.RETRY, _describe(exc), attempts)


def dead_letter_headers(raw: RawDelivery, queue: str, decision: Decision) -> dict[str, Any]:
    """The headers of the dead-lettered copy: the original ones plus reason, queue, attempts, sender."""
    headers = dict(raw.headers)
    headers[REASON_HEADER] = decision.reason
    headers[ORIGINAL_QUEUE_HEADER] = queue
    headers[ATTEMPTS_HEADER] = decision.attempts
    if raw.user_id:
        headers[ORIGINAL_USER_HEADER] = raw.user_id
    return headers
