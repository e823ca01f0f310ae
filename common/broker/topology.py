"""Exchanges and queues: their names, their properties, and declaring them idempotently.

Properties that are not negotiable (DESIGN.md, "Topology"): durable queues, quorum queues where the
broker supports them (classic durable queues otherwise, with the reason logged), except the
workers' release queues (see :data:`RELEASE_QUEUES_QUORUM`), a dead-letter queue
for every queue — named by :func:`dead_letter_queue_name` and reached through
:data:`DEAD_LETTER_EXCHANGE` with the queue's name as routing key — delivery limits on quorum
queues, single-active-consumer for the coordinator's queues.

:func:`declare` may run any number of times (every process declares what it uses at start-up):
declaring an existing queue with the same arguments is a no-op for RabbitMQ. A queue that already
exists with the other type is kept as it is (RabbitMQ cannot convert it), with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import pika
from pika.adapters.blocking_connection import BlockingChannel

from common.broker.errors import translating_pika_errors
from common.errors import BrokerChannelClosedError

logger = logging.getLogger(__name__)

DEAD_LETTER_EXCHANGE = "fedmq.dlx"
CONTROL_QUEUE = "fedmq.control"
RESULTS_QUEUE = "fedmq.results"
TASKS_EXCHANGE = "fedmq.tasks"
RELEASES_EXCHANGE = "fedmq.releases"
FETCH_QUEUE = "fedmq.fetch"
#: The coordinator's copy of every task the broker dead-lettered from a worker's task queue (bound to
#: the dead-letter exchange with each worker's task-queue name), so a round need not wait for its
#: deadline when a task killed its worker every time it was delivered.
DEAD_TASKS_QUEUE = "fedmq.dead-tasks"
#: The one exchange workers may write to; routes results and fetch requests to the coordinator.
RESULTS_EXCHANGE = "fedmq.results"
RESULTS_ROUTE = "results"
FETCH_ROUTE = "fetch"

#: Release queues are classic durable queues. A release is a copy of a version SQL holds (a worker
#: that misses one fetches it), and the fanout copies it into every worker's queue: classic queues
#: keep one copy of a persistent body in the broker's shared message store whatever the number of
#: queues, a quorum queue writes its own copy to its log. Measured on RabbitMQ 3.10, 2 cores, 100 MB
#: in 4 MiB chunks fanned out to 4 queues: published and confirmed in 0.3-0.46 s (classic) against
#: 0.8-1.24 s (quorum), with 0.2-0.3 s of broker CPU against 0.5-0.9 s.
RELEASE_QUEUES_QUORUM = False

ExchangeType = Literal["direct", "fanout", "topic", "headers"]
QueueKind = Literal["quorum", "classic"]


def dead_letter_queue_name(queue: str) -> str:
    """The dead-letter queue of ``queue`` (also the DLX routing key is ``queue`` itself)."""
    return f"{queue}.dlq"


def worker_task_queue(worker_id: str) -> str:
    """The queue holding one worker's tasks (bound to :data:`TASKS_EXCHANGE` by the worker id)."""
    return f"fedmq.tasks.{worker_id}"


def worker_release_queue(worker_id: str) -> str:
    """The queue receiving one worker's copy of every release (bound to :data:`RELEASES_EXCHANGE`)."""
    return f"fedmq.releases.{worker_id}"


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: ExchangeType = "direct"
    durable: bool = True


@dataclass(frozen=True)
class Binding:
    exchange: str
    routing_key: str = ""


@dataclass(frozen=True)
class QueueSpec:
    """One queue. ``delivery_limit`` applies to quorum queues (the consumer also counts on classic ones)."""

    name: str
    quorum: bool = True
    single_active_consumer: bool = False
    delivery_limit: int | None = 5
    dead_letter: bool = True
    bindings: tuple[Binding, ...] = ()
    max_length_bytes: int | None = None


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec, ...] = ()


@dataclass
class DeclaredTopology:
    """What :func:`declare` actually got from the broker: each queue's kind."""

    kinds: dict[str, QueueKind] = field(default_factory=dict)


def queue_arguments(spec: QueueSpec, kind: QueueKind) -> dict[str, Any]:
    """The ``x-`` arguments of ``spec`` declared as a ``kind`` queue (a pure function)."""
    args: dict[str, Any] = {}
    if kind == "quorum":
        args["x-queue-type"] = "quorum"
        if spec.delivery_limit is not None:
            args["x-delivery-limit"] = spec.delivery_limit
    if spec.single_active_consumer:
        args["x-single-active-consumer"] = True
    if spec.dead_letter:
        args["x-dead-letter-exchange"] = DEAD_LETTER_EXCHANGE
        args["x-dead-letter-routing-key"] = spec.name
    if spec.max_length_bytes is not None:
        args["x-max-length-bytes"] = spec.max_length_bytes
    return args


def with_dead_letter_queues(topology: Topology) -> Topology:
    """``topology`` plus the dead-letter exchange and one dead-letter queue per dead-lettered queue."""
    exchanges = list(topology.exchanges)
    if all(e.name != DEAD_LETTER_EXCHANGE for e in exchanges):
        exchanges.append(ExchangeSpec(DEAD_LETTER_EXCHANGE, "direct"))
    queues = list(topology.queues)
    names = {q.name for q in queues}
    for spec in topology.queues:
        dlq = dead_letter_queue_name(spec.name)
        if spec.dead_letter and dlq not in names:
            queues.append(
                QueueSpec(
                    dlq,
                    quorum=spec.quorum,
                    delivery_limit=None,
                    dead_letter=False,
                    bindings=(Binding(DEAD_LETTER_EXCHANGE, spec.name),),
                )
            )
            names.add(dlq)
    return Topology(tuple(exchanges), tuple(queues))


def fedmq_topology(worker_ids: tuple[str, ...] = ()) -> Topology:
    """The coordinator's and the given workers' exchanges and queues (see DESIGN.md)."""
    queues = [
        QueueSpec(CONTROL_QUEUE, single_active_consumer=True),
        QueueSpec(
            RESULTS_QUEUE, single_active_consumer=True, bindings=(Binding(RESULTS_EXCHANGE, RESULTS_ROUTE),)
        ),
        QueueSpec(
            FETCH_QUEUE, single_active_consumer=True, bindings=(Binding(RESULTS_EXCHANGE, FETCH_ROUTE),)
        ),
    ]
    for worker in worker_ids:
        queues.append(QueueSpec(worker_task_queue(worker), bindings=(Binding(TASKS_EXCHANGE, worker),)))
        queues.append(
            QueueSpec(
                worker_release_queue(worker),
                quorum=RELEASE_QUEUES_QUORUM,
                bindings=(Binding(RELEASES_EXCHANGE),),
            )
        )
    queues.append(
        QueueSpec(
            DEAD_TASKS_QUEUE,
            single_active_consumer=True,
            bindings=tuple(Binding(DEAD_LETTER_EXCHANGE, worker_task_queue(w)) for w in worker_ids),
        )
    )
    exchanges = (
        ExchangeSpec(TASKS_EXCHANGE, "direct"),
        ExchangeSpec(RELEASES_EXCHANGE, "fanout"),
        ExchangeSpec(RESULTS_EXCHANGE, "direct"),
    )
    return Topology(exchanges, tuple(queues))


def _declare_queue(
    connection: pika.BlockingConnection, channel: BlockingChannel, spec: QueueSpec
) -> tuple[BlockingChannel, QueueKind]:
    """Declare one queue, falling back to classic when the broker refuses a quorum queue."""
    if spec.quorum:
        try:
            with translating_pika_errors():
                channel.queue_declare(spec.name, durable=True, arguments=queue_arguments(spec, "quorum"))
            return channel, "quorum"
        except BrokerChannelClosedError as exc:
            if exc.reply_code not in (406, 540):  # PRECONDITION_FAILED, NOT_IMPLEMENTED
                raise
            logger.warning(
                "queue %s: broker refused a quorum queue (%s); using a classic durable queue",
                spec.name,
                exc.reply_text,
            )
            with translating_pika_errors():
                channel = connection.channel()
        with translating_pika_errors():
            channel.queue_declare(spec.name, durable=True, arguments=queue_arguments(spec, "classic"))
        return channel, "classic"
    try:
        with translating_pika_errors():
            channel.queue_declare(spec.name, durable=True, arguments=queue_arguments(spec, "classic"))
        return channel, "classic"
    except BrokerChannelClosedError as exc:
        if exc.reply_code != 406:  # PRECONDITION_FAILED: it exists with other arguments
            raise
        logger.warning(
            "queue %s exists as a quorum queue (%s); keeping it (delete it to get a classic one)",
            spec.name,
            exc.reply_text,
        )
    with translating_pika_errors():
        channel = connection.channel()
        channel.queue_declare(spec.name, durable=True, arguments=queue_arguments(spec, "quorum"))
    return channel, "quorum"


def declare(connection: pika.BlockingConnection, topology: Topology) -> DeclaredTopology:
    """Declare ``topology`` and its dead-letter queues on ``connection``; safe to repeat."""
    full = with_dead_letter_queues(topology)
    declared = DeclaredTopology()
    with translating_pika_errors():
        channel = connection.channel()
        for exchange in full.exchanges:
            channel.exchange_declare(exchange.name, exchange.type, durable=exchange.durable)
    for spec in full.queues:
        channel, kind = _declare_queue(connection, channel, spec)
        declared.kinds[spec.name] = kind
        with translating_pika_errors():
            for binding in spec.bindings:
                channel.queue_bind(spec.name, binding.exchange, routing_key=binding.routing_key)
    with translating_pika_errors():
        channel.close()
    logger.info("declared %d exchanges and %d queues", len(full.exchanges), len(full.queues))
    return declared
