"""pika's exceptions become fedmq's in one place, and none is left out."""

from __future__ import annotations

import inspect

import pika.exceptions as px
import pytest

from common.broker.errors import PIKA_ERRORS, is_retryable, to_fedmq_error, translating_pika_errors
from common.errors import (
    BrokerAccessRefusedError,
    BrokerChannelClosedError,
    BrokerError,
    BrokerUnreachableError,
    MessageNackedError,
    UnroutableMessageError,
)


def _pika_exception_classes() -> list[type[BaseException]]:
    return [
        obj
        for _, obj in inspect.getmembers(px, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == px.__name__
    ]


def test_every_pika_exception_class_is_mapped_explicitly():
    missing = [cls.__name__ for cls in _pika_exception_classes() if cls not in PIKA_ERRORS]

    assert missing == []


@pytest.mark.parametrize("pika_class", _pika_exception_classes(), ids=lambda c: c.__name__)
def test_every_pika_exception_comes_out_as_a_broker_error(pika_class):
    exc = pika_class.__new__(pika_class)
    exc.args = (
        (320, "CONNECTION_FORCED") if issubclass(pika_class, px.ConnectionClosed | px.ChannelClosed) else ()
    )
    if issubclass(pika_class, px.UnroutableError | px.NackError):
        exc = pika_class([])

    with pytest.raises(BrokerError) as caught, translating_pika_errors():
        raise exc

    assert caught.value.__cause__ is exc
    assert "pika" not in type(caught.value).__module__


def test_refused_channel_keeps_the_brokers_reply():
    error = to_fedmq_error(px.ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg"))

    assert isinstance(error, BrokerChannelClosedError)
    assert error.reply_code == 406
    assert "PRECONDITION_FAILED" in str(error)


def test_access_refused_is_not_retryable_but_a_lost_connection_is():
    refused = to_fedmq_error(px.ChannelClosedByBroker(403, "ACCESS_REFUSED"))
    bad_login = to_fedmq_error(px.ProbableAuthenticationError("login refused"))
    lost = to_fedmq_error(px.StreamLostError("reset by peer"))

    assert isinstance(refused, BrokerAccessRefusedError)
    assert isinstance(bad_login, BrokerAccessRefusedError)
    assert isinstance(lost, BrokerUnreachableError)
    assert is_retryable(lost) and not is_retryable(refused) and not is_retryable(bad_login)


def test_publish_refusals_have_their_own_errors():
    assert isinstance(to_fedmq_error(px.UnroutableError([])), UnroutableMessageError)
    assert isinstance(to_fedmq_error(px.NackError([])), MessageNackedError)


def test_socket_errors_mean_the_broker_is_unreachable():
    with pytest.raises(BrokerUnreachableError), translating_pika_errors():
        raise ConnectionRefusedError("connection refused")
