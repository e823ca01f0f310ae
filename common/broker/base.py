"""The seam between fedmq and its message broker: :class:`Broker` and :class:`MessageConsumer`.

Two implementations: :class:`~common.broker.rabbitmq.RabbitmqBroker` (the real one) and
:class:`~common.broker.stub.StubBroker` (in memory, for unit tests). Both chunk large bodies,
reassemble them, and apply the same ack / retry / dead-letter rules
(:mod:`common.broker.processing`), so code tested on the stub behaves the same on RabbitMQ.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from common.broker.message import OutgoingMessage
from common.broker.processing import BatchHandler, Handler
from common.broker.topology import DeclaredTopology, Topology


class MessageConsumer(ABC):
    """Delivers the messages of one queue to one handler."""

    @abstractmethod
    def start(self) -> None:
        """Start consuming in the background."""

    @abstractmethod
    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop consuming after the message in hand is settled."""


class Broker(ABC):
    """Declares topology, publishes confirmed messages and creates consumers."""

    @abstractmethod
    def declare(self, topology: Topology) -> DeclaredTopology:
        """Declare exchanges, queues and their dead-letter queues; harmless to repeat."""

    @abstractmethod
    def publish(self, message: OutgoingMessage) -> None:
        """Publish and return once the broker has taken responsibility for every chunk.

        Raises :class:`~common.errors.UnroutableMessageError` for a mandatory message no queue takes.
        """

    @abstractmethod
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
    ) -> MessageConsumer:
        """A consumer of ``queue`` (not started). Deliveries in hand at once (up to ``max_batch``)
        are settled together (their chunks made durable at once); with ``batch_handler`` they are
        also handled together (see :mod:`common.broker.processing`).

        ``durable_chunks=False``: chunks are acked once written, without fsync — only for bodies
        that are verified before use and can be had again (a worker's releases): an OS crash may
        lose such a transfer, a process crash never does.

        ``memory_budget``: bytes of chunked bodies in flight that are also kept in memory, so the
        handler gets them without reading their file back from the disk, which is then written
        past the page cache even without fsync (see :class:`common.broker.chunks.Reassembler`); 0
        keeps memory at one chunk per message."""

    @abstractmethod
    def close(self) -> None:
        """Release connections opened by this broker object."""
