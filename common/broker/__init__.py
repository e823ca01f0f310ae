"""fedmq's RabbitMQ layer: topology, confirmed publishing, consumers, chunked transfers.

Module map (the file names are the architecture):

- :mod:`~common.broker.config`      BrokerConfig and its one mapping from the settings object
- :mod:`~common.broker.errors`      the one place pika's exceptions become fedmq's
- :mod:`~common.broker.connection`  connecting (URL, TLS, heartbeat) and capped-backoff reconnects
- :mod:`~common.broker.topology`    names, queue properties, idempotent declare, dead-letter queues
- :mod:`~common.broker.message`     OutgoingMessage, Delivery and the headers the layer adds
- :mod:`~common.broker.chunks`      chunk framing and bounded-memory, crash-safe reassembly
- :mod:`~common.broker.processing`  ack / retry / dead-letter rules shared by every consumer
- :mod:`~common.broker.publisher`   confirms + mandatory, persistent, chunking
- :mod:`~common.broker.consumer`    prefetch, handler off the I/O thread, thread-safe acks
- :mod:`~common.broker.base`        the Broker seam; :mod:`~common.broker.rabbitmq` and
  :mod:`~common.broker.stub` implement it
- :mod:`~common.broker.admin`       per-worker users and permissions on a development node
"""

from __future__ import annotations

from common.broker.base import Broker, MessageConsumer
from common.broker.config import BrokerConfig, broker_config_from_settings
from common.broker.message import Delivery, OutgoingMessage
from common.broker.processing import Handler
from common.broker.rabbitmq import RabbitmqBroker
from common.broker.stub import StubBroker
from common.broker.topology import (
    Binding,
    ExchangeSpec,
    QueueSpec,
    Topology,
    dead_letter_queue_name,
    fedmq_topology,
)

__all__ = [
    "Binding",
    "Broker",
    "BrokerConfig",
    "Delivery",
    "ExchangeSpec",
    "Handler",
    "MessageConsumer",
    "OutgoingMessage",
    "QueueSpec",
    "RabbitmqBroker",
    "StubBroker",
    "Topology",
    "broker_config_from_settings",
    "dead_letter_queue_name",
    "fedmq_topology",
]
