"""Topology names and queue properties, configuration mapping and reconnect delays (pure functions)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from common.broker.config import BrokerConfig, broker_config_from_settings
from common.broker.connection import backoff_delays, connection_parameters, url_username
from common.broker.topology import (
    CONTROL_QUEUE,
    DEAD_LETTER_EXCHANGE,
    QueueSpec,
    fedmq_topology,
    queue_arguments,
    with_dead_letter_queues,
)
from common.errors import ConfigError
from common.settings import Settings


def test_every_queue_gets_a_dead_letter_queue_bound_by_its_own_name():
    full = with_dead_letter_queues(fedmq_topology(("w1",)))

    names = {q.name for q in full.queues}
    for spec in fedmq_topology(("w1",)).queues:
        dlq = next(q for q in full.queues if q.name == f"{spec.name}.dlq")
        assert [(b.exchange, b.routing_key) for b in dlq.bindings] == [(DEAD_LETTER_EXCHANGE, spec.name)]
        assert not dlq.dead_letter
    assert DEAD_LETTER_EXCHANGE in {e.name for e in full.exchanges}
    assert len(names) == 2 * len(fedmq_topology(("w1",)).queues)


def test_adding_dead_letter_queues_twice_changes_nothing():
    once = with_dead_letter_queues(fedmq_topology(("w1", "w2")))

    assert with_dead_letter_queues(once) == once


def test_quorum_queue_arguments_carry_the_delivery_limit_and_dead_letter_route():
    args = queue_arguments(QueueSpec("q", single_active_consumer=True, delivery_limit=4), "quorum")

    assert args == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 4,
        "x-single-active-consumer": True,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": "q",
    }


def test_classic_fallback_drops_only_what_classic_queues_lack():
    args = queue_arguments(QueueSpec("q", delivery_limit=4), "classic")

    assert "x-queue-type" not in args and "x-delivery-limit" not in args
    assert args["x-dead-letter-routing-key"] == "q"


def test_coordinator_queues_are_single_active_consumer():
    control = next(q for q in fedmq_topology().queues if q.name == CONTROL_QUEUE)

    assert control.single_active_consumer


def test_backoff_doubles_up_to_the_cap():
    delays = list(itertools.islice(backoff_delays(0.5, 4.0), 6))

    assert [round(d / b, 1) <= 1.1 for d, b in zip(delays, [0.5, 1, 2, 4, 4, 4], strict=True)] == [True] * 6
    assert all(d >= b for d, b in zip(delays, [0.5, 1, 2, 4, 4, 4], strict=True))


def test_config_comes_from_the_settings_object():
    settings = Settings(amqp_url="amqps://w1:secret@broker.example:5671/fl", chunk_size=2 * 1024 * 1024)

    config = broker_config_from_settings(settings, spill_dir=Path("/tmp/x"))

    assert config.amqp_url == settings.amqp_url
    assert config.chunk_size == 2 * 1024 * 1024
    assert url_username(config) == "w1"


def test_an_amqps_url_gets_tls_and_our_heartbeat():
    params = connection_parameters(
        BrokerConfig(amqp_url="amqps://u:p@localhost:5671/%2F", heartbeat_s=7), "t"
    )

    assert params.ssl_options is not None
    assert params.heartbeat == 7
    assert params.client_properties["connection_name"] == "t"


@pytest.mark.parametrize("bad", [{"chunk_size": 17 * 1024 * 1024}, {"max_delivery_attempts": 0}])
def test_impossible_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        BrokerConfig(**bad)


def test_a_non_amqp_url_is_refused():
    with pytest.raises(ConfigError):
        connection_parameters(BrokerConfig(amqp_url="http://localhost"), "t")
