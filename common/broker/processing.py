"""What happens to one delivery, decided the same way by the RabbitMQ consumer and the stub broker.

:class:`DeliveryProcessor` turns a raw delivery into a :class:`Decision` — ack it, give it back for
another attempt, or dead-letter it with a reason — and never raises. It reassembles chunks, calls
the handler and classifies its outcome:

- the handler returns: ack (after it returned, never before);
- it raises :class:`~common.errors.DecodeError` or :class:`~common.errors.PoisonMessageError`: the
  message can never succeed, dead-letter it now;
- it raises anything else: retry, until the message has been tried ``max_attempts`` times, then
  dead-letter it with the last error as the reason.

With a batch handler, the complete messages of a batch (several deliveries the consumer had in hand
at once) are handled together, e.g. in one database transaction, and each gets its own decision; a
batch that fails as a whole is handled again one message at a time.

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
from collections.abc import Callable, Mapping, Sequence
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
# Handles several messages at once and answers for each: None (done) or the error it ended with, as
# the single handler would have raised it. Raising instead means nothing of the batch took effect.
BatchHandler = Callable[[Sequence[Delivery]], Sequence[BaseException | None]]
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


@dataclass(frozen=True)
class _Ready:
    """A message of a batch and what deciding about it needs."""

    index: int
    key: str
    attempts: int
    delivery: Delivery | None = None
    transfer: str | None = None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


class DeliveryProcessor:
    """Runs ``handler`` on the deliveries of ``queue``; see the module docstring for the rules."""

    def __init__(
        self,
        queue: str,
        handler: Handler,
        reassembler: Reassembler,
        max_attempts: int,
        batch_handler: BatchHandler | None = None,
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.batch_handler = batch_handler
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
        return self.process_batch([raw])[0]

    def process_batch(self, raws: Sequence[RawDelivery]) -> list[Decision]:
        """Decide for each of ``raws``, in order; the complete messages among them go to the batch
        handler together (when there is one and more than one is complete), else one by one.

        A batch handler that raises has committed nothing (its contract): every message of the batch
        then goes through the single-message handler on its own, so one bad message cannot hold back
        or dead-letter the others.
        """
        self._expire_stale_transfers()
        decisions: list[Decision | None] = [None] * len(raws)
        ready: list[_Ready] = []
        for index, raw in enumerate(raws):
            prepared = self._prepare(index, raw)
            if isinstance(prepared, Decision):
                decisions[index] = prepared
            else:
                ready.append(prepared)
        for item, decision in zip(ready, self._handle(ready), strict=True):
            decisions[item.index] = self._conclude(item, decision)
        # Chunks were stored without fsync; make the batch's durable at once before any is acked
        # (raising here: the caller gives the whole batch back, and handlers are idempotent).
        self.reassembler.sync()
        return [d for d in decisions if d is not None]

    def _prepare(self, index: int, raw: RawDelivery) -> _Ready | Decision:
        """The complete message ``raw`` carries, or the decision about it when there is none yet."""
        try:
            chunk = ChunkHeader.from_headers(raw.headers)
        except DecodeError as exc:
            return Decision(Outcome.DEAD_LETTER, _describe(exc))
        key = self._key(raw, chunk)
        attempts = self._attempts(raw, key)
        try:
            delivery = self._delivery(raw, chunk, attempts)
        except DecodeError as exc:  # a chunk that cannot belong to a good transfer
            logger.warning("queue %s: rejecting chunk: %s", self.queue, exc)
            return Decision(Outcome.DEAD_LETTER, _describe(exc), attempts)
        except Exception as exc:  # a full disk or a bug here: counted like a handler failure
            return self._conclude(_Ready(index, key, attempts), self._failure(exc, attempts, raw.message_id))
        if delivery is None:
            return Decision(Outcome.ACK, attempts=attempts)
        return _Ready(index, key, attempts, delivery, chunk.transfer_id if chunk is not None else None)

    def _handle(self, ready: list[_Ready]) -> list[Decision]:
        deliveries = [item.delivery for item in ready if item.delivery is not None]
        if self.batch_handler is not None and len(deliveries) > 1:
            try:
                errors = list(self.batch_handler(deliveries))
                if len(errors) != len(deliveries):
                    raise RuntimeError(f"batch handler answered {len(errors)} of {len(deliveries)} messages")
            except Exception as exc:
                logger.warning(
                    "queue %s: a batch of %d failed (%s); handling each on its own",
                    self.queue,
                    len(deliveries),
                    _describe(exc),
                )
            else:
                return [
                    self._judge(error, delivery) for error, delivery in zip(errors, deliveries, strict=True)
                ]
        return [self._run_handler(delivery) for delivery in deliveries]

    def _conclude(self, item: _Ready, decision: Decision) -> Decision:
        if decision.outcome is Outcome.RETRY:
            self._record_failure(item.key, item.attempts)
        else:
            self._failures.pop(item.key, None)
            if item.transfer is not None:
                self.reassembler.finish(item.transfer)
        return decision

    def _delivery(self, raw: RawDelivery, chunk: ChunkHeader | None, attempts: int) -> Delivery | None:
        """The delivery for the handler, or ``None`` while a transfer still misses chunks."""
        body: dict[str, Any]
        if chunk is None:
            body = {"data": raw.body, "size": len(raw.body)}
        else:
            completed = self.reassembler.add(chunk, raw.body, raw.user_id, sync=False)
            if completed is None:
                return None
            body = {
                "path": completed.path,
                "size": completed.size,
                "data": completed.data,
                "tail_offset": completed.tail_offset,
                "tail_sha256": completed.tail_sha256,
            }
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

    def _run_handler(self, delivery: Delivery) -> Decision:
        try:
            self.handler(delivery)
        except Exception as exc:
            return self._judge(exc, delivery)
        return Decision(Outcome.ACK, attempts=delivery.attempts)

    def _judge(self, error: BaseException | None, delivery: Delivery) -> Decision:
        """The decision for a message whose handling ended with ``error`` (None: it succeeded)."""
        if error is None:
            return Decision(Outcome.ACK, attempts=delivery.attempts)
        if isinstance(error, DecodeError | PoisonMessageError):
            logger.warning("queue %s: message %s is poison: %s", self.queue, delivery.message_id, error)
            return Decision(Outcome.DEAD_LETTER, _describe(error), delivery.attempts)
        if not isinstance(error, Exception):
            raise error
        return self._failure(error, delivery.attempts, delivery.message_id)

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
