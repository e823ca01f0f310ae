"""The one place where pika's exceptions become fedmq's (see :mod:`common.errors`).

Every call into pika that can fail runs inside :func:`translating_pika_errors`; nothing above this
package ever sees a pika exception. The table :data:`PIKA_ERRORS` names every class of
``pika.exceptions`` explicitly (a unit test checks none is missing), so a pika upgrade that adds one
fails the tests instead of leaking it.

    pika                                   fedmq
    AMQPConnectionError and most of its    BrokerUnreachableError  (retry with backoff)
      subclasses, heartbeat timeout,
      stream lost, closed by broker
    ProbableAuthenticationError,           BrokerAccessRefusedError
      AuthenticationError, ProbableAccessDenied, close codes 403/530
    ChannelClosed(ByBroker|ByClient)       BrokerChannelClosedError (reply code and text kept)
    UnroutableError                        UnroutableMessageError  (mandatory publish, no queue)
    NackError                              MessageNackedError
    anything else                          BrokerError
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pika.exceptions as px

from common.errors import (
    BrokerAccessRefusedError,
    BrokerChannelClosedError,
    BrokerError,
    BrokerUnreachableError,
    MessageNackedError,
    UnroutableMessageError,
)

logger = logging.getLogger(__name__)

_ACCESS_REFUSED_CODES = {403, 530}

PIKA_ERRORS: dict[type[BaseException], type[BrokerError]] = {
    px.AMQPError: BrokerError,
    px.AMQPConnectionError: BrokerUnreachableError,
    px.ConnectionOpenAborted: BrokerUnreachableError,
    px.StreamLostError: BrokerUnreachableError,
    px.IncompatibleProtocolError: BrokerUnreachableError,
    px.AuthenticationError: BrokerAccessRefusedError,
    px.ProbableAuthenticationError: BrokerAccessRefusedError,
    px.ProbableAccessDeniedError: BrokerAccessRefusedError,
    px.NoFreeChannels: BrokerError,
    px.ConnectionWrongStateError: BrokerUnreachableError,
    px.ConnectionClosed: BrokerUnreachableError,
    px.ConnectionClosedByBroker: BrokerUnreachableError,
    px.ConnectionClosedByClient: BrokerUnreachableError,
    px.ConnectionBlockedTimeout: BrokerUnreachableError,
    px.AMQPHeartbeatTimeout: BrokerUnreachableError,
    px.AMQPChannelError: BrokerChannelClosedError,
    px.ChannelWrongStateError: BrokerChannelClosedError,
    px.ChannelClosed: BrokerChannelClosedError,
    px.ChannelClosedByBroker: BrokerChannelClosedError,
    px.ChannelClosedByClient: BrokerChannelClosedError,
    px.DuplicateConsumerTag: BrokerError,
    px.ConsumerCancelled: BrokerChannelClosedError,
    px.UnroutableError: UnroutableMessageError,
    px.NackError: MessageNackedError,
    px.InvalidChannelNumber: BrokerError,
    px.ProtocolSyntaxError: BrokerError,
    px.UnexpectedFrameError: BrokerError,
    px.ProtocolVersionMismatch: BrokerError,
    px.BodyTooLongError: BrokerError,
    px.InvalidFrameError: BrokerError,
    px.InvalidFieldTypeException: BrokerError,
    px.UnsupportedAMQPFieldException: BrokerError,
    px.MethodNotImplemented: BrokerError,
    px.ChannelError: BrokerError,
    px.ReentrancyError: BrokerError,
    px.ShortStringTooLong: BrokerError,
    px.DuplicateGetOkCallback: BrokerError,
}

_PIKA_BASES: tuple[type[BaseException], ...] = (px.AMQPError, px.ChannelError, px.ReentrancyError)


def _reply(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, px.ConnectionClosed | px.ChannelClosed):
        return int(exc.reply_code), str(exc.reply_text)
    return 0, ""


def to_fedmq_error(exc: BaseException) -> BrokerError:
    """The fedmq error for a pika exception (its ``__cause__`` is set by the caller's ``from``)."""
    target: type[BrokerError] = BrokerError
    for klass in type(exc).__mro__:
        if klass in PIKA_ERRORS:
            target = PIKA_ERRORS[klass]
            break
    code, text = _reply(exc)
    if code in _ACCESS_REFUSED_CODES:
        target = BrokerAccessRefusedError
    message = f"{type(exc).__name__}: {exc}" if code == 0 else f"({code}) {text}"
    if target is BrokerChannelClosedError:
        return BrokerChannelClosedError(f"RabbitMQ closed the channel: {message}", code, text)
    if target is BrokerUnreachableError:
        return BrokerUnreachableError(f"RabbitMQ connection failed or lost: {message}")
    if target is BrokerAccessRefusedError:
        return BrokerAccessRefusedError(f"RabbitMQ refused access: {message}")
    if target is UnroutableMessageError:
        return UnroutableMessageError(f"no queue is bound for the message: {message}")
    if target is MessageNackedError:
        return MessageNackedError(f"RabbitMQ refused the message: {message}")
    return target(f"RabbitMQ error: {message}")


def is_retryable(exc: BaseException) -> bool:
    """True for errors a reconnect may cure (lost or unreachable broker), false for refusals."""
    return isinstance(exc, BrokerUnreachableError)


@contextmanager
def translating_pika_errors() -> Iterator[None]:
    """Run a block of pika calls; re-raise any pika exception as its :class:`BrokerError`.

    ``OSError`` from the socket layer (refused, reset) becomes :class:`BrokerUnreachableError` too.
    """
    try:
        yield
    except _PIKA_BASES as exc:
        raise to_fedmq_error(exc) from exc
    except OSError as exc:
        raise BrokerUnreachableError(f"RabbitMQ connection failed or lost: {exc}") from exc
