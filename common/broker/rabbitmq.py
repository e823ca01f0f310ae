"""The RabbitMQ implementation of :class:`~common.broker.base.Broker` on pika.

Connections are not shared between threads: each thread that publishes gets its own
:class:`~common.broker.publisher.Publisher`, each consumer its own connection.
"""

from __future__ import annotations

import threading

from common.broker.base import Broker, MessageConsumer
from common.broker.chunks import Reassembler
from common.broker.config import BrokerConfig
from common.broker.connection import close_quietly, connect_with_retry
from common.broker.consumer import Consumer
from common.broker.message import OutgoingMessage
from common.broker.processing import BatchHandler, Handler
from common.broker.publisher import Publisher
from common.broker.topology import DeclaredTopology, Topology, declare


class RabbitmqConsumer(MessageConsumer):
    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer

    def start(self) -> None:
        self.consumer.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        self.consumer.stop(timeout)


class RabbitmqBroker(Broker):
    """Talks to the RabbitMQ at ``config.amqp_url``.

    ``connect_deadline_s`` bounds how long :meth:`declare` waits for an unreachable broker.
    """

    def __init__(self, config: BrokerConfig, name: str = "fedmq", connect_deadline_s: float = 60.0) -> None:
        self.config = config
        self.name = name
        self.connect_deadline_s = connect_deadline_s
        self._local = threading.local()
        self._publishers: list[Publisher] = []
        self._lock = threading.Lock()

    def declare(self, topology: Topology) -> DeclaredTopology:
        connection = connect_with_retry(
            self.config, f"{self.name}-declare", deadline_s=self.connect_deadline_s
        )
        try:
            assert connection is not None  # no stop event: only a deadline ends the retries
            return declare(connection, topology)
        finally:
            close_quietly(connection)

    def _publisher(self) -> Publisher:
        publisher: Publisher | None = getattr(self._local, "publisher", None)
        if publisher is None:
            publisher = Publisher(self.config, f"{self.name}-publisher-{threading.current_thread().name}")
            self._local.publisher = publisher
            with self._lock:
                self._publishers.append(publisher)
        return publisher

    def publish(self, message: OutgoingMessage) -> None:
        self._publisher().publish(message)

    def consumer(
        self,
        queue: str,
        handler: Handler,
        prefetch: int = 1,
        *,
        batch_handler: BatchHandler | None = None,
        max_batch: int = 1,
        durable_chunks: bool = True,
        memory_budget: int = 0,
    ) -> RabbitmqConsumer:
        reassembler = Reassembler(
            self.config.transfers_dir(queue),
            self.config.max_transfer_size,
            fsync=durable_chunks,
            memory_budget=memory_budget,
        )
        return RabbitmqConsumer(
            Consumer(
                self.config,
                queue,
                handler,
                prefetch=prefetch,
                name=f"{self.name}-consumer-{queue}",
                reassembler=reassembler,
                batch_handler=batch_handler,
                max_batch=max_batch,
            )
        )

    def close(self) -> None:
        with self._lock:
            publishers, self._publishers = self._publishers, []
        for publisher in publishers:
            publisher.close()
