"""The coordinator daemon: consumes submissions and results, keeps rounds moving, relays the outbox.

Threads (pika rule: one connection per thread; the broker layer gives each consumer its own):

- control consumer (single-active): StartRun, CancelRun — an invalid submission is dead-lettered
  with its reason, never retried forever;
- results consumer (single-active): DeltaReport, TaskFailed, Heartbeat — recorded in SQL and acked
  only after the commit (the broker layer acks when the handler returns). The deltas the consumer
  holds at once (up to :data:`RESULTS_BATCH`) are committed in one transaction;
- fetch consumer (single-active): FetchModel requests, answered with the signed release;
- the outbox relay, and a ticker that advances rounds whose deadline passed.

A standby coordinator started beside this one waits on the single-active-consumer queues and takes
over when this one dies; round state is in SQL, so it continues where the other stopped.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence

from sqlalchemy import select

from common.broker import Broker, Delivery, OutgoingMessage
from common.broker.connection import url_username
from common.broker.topology import (
    CONTROL_QUEUE,
    DEAD_TASKS_QUEUE,
    FETCH_QUEUE,
    RESULTS_QUEUE,
    fedmq_topology,
)
from common.errors import ConfigError, DecodeError, NotFoundError, PoisonMessageError
from common.faults import fault_point
from common.messages import (
    CancelRun,
    DeltaReport,
    FetchModel,
    Heartbeat,
    JobResult,
    Message,
    StartRun,
    SubmitJob,
    TaskFailed,
    TrainTask,
    decode,
)
from common.release import EncodedRelease, encode_release
from coordinator import jobs
from coordinator.db.blobs import FileRegion, sweep_blob_files
from coordinator.db.engine import Database
from coordinator.db.models import Model, ModelVersion, Worker
from coordinator.outbox import OutboxRelay
from coordinator.registry import ModelRegistry
from coordinator.rounds import RoundEngine, utcnow

logger = logging.getLogger(__name__)

# Results in flight to the coordinator at once, and the largest group committed together. The
# window is twice the group, so the next group is already arriving while one is committed (with
# the two equal, the consumer waited for each group's ack to reach the broker and the next 64
# messages to come back: drained ~1700 small deltas/s against ~2700 now). Large deltas arrive in
# chunks (4 MiB by default): the consumer also caps a group at about 16 MiB, and up to
# RESULTS_PREFETCH chunks (512 MiB with the default chunk size) may wait in memory to be written.
RESULTS_MEMORY_BUDGET = 512 * 1024 * 1024  # bytes of chunked deltas in flight kept in memory
RESULTS_PREFETCH = 128
RESULTS_BATCH = 64


class Coordinator:
    """Wires the round engine to the broker; :meth:`run` blocks until ``stop`` is set."""

    def __init__(
        self,
        db: Database,
        registry: ModelRegistry,
        broker: Broker,
        engine: RoundEngine | None = None,
        tick_s: float = 0.5,
    ) -> None:
        self.db = db
        self.registry = registry
        self.broker = broker
        self.engine = engine or RoundEngine(db, registry)
        self.relay = OutboxRelay(db, broker, self.release_body)
        self.tick_s = tick_s
        self.ready = threading.Event()
        config = getattr(broker, "config", None)
        # The user the coordinator publishes as (the broker stamps it on what the relay sends).
        self._broker_user = url_username(config) if config is not None else getattr(broker, "user_id", None)

    # --------------------------------------------------------------------------- releases

    def release_body(self, model: str, version: int) -> EncodedRelease:
        """The encoded ModelRelease of ``model`` ``version`` (signed parts from the registry)."""
        with self.db.session() as session:
            row = session.scalar(select(Model).where(Model.name == model))
            if row is None:
                raise NotFoundError(f"model {model!r} does not exist")
            ver = session.scalar(
                select(ModelVersion).where(ModelVersion.model_pk == row.id, ModelVersion.version == version)
            )
            if ver is None:
                raise NotFoundError(f"model {model!r} has no version {version}")
            frame = self.registry.frames.read(session, ver.weights_blob_id, ver.weights_sha256)
            return encode_release(
                model, version, row.code_envelope, ver.signature, frame, row.code_sha256, ver.weights_sha256
            )

    # --------------------------------------------------------------------------- handlers

    def on_control(self, delivery: Delivery) -> None:
        message: Message = decode(delivery.body)
        try:
            if isinstance(message, StartRun):
                self.engine.start_run(message)
            elif isinstance(message, CancelRun):
                self.engine.cancel_run(message)
            elif isinstance(message, SubmitJob):
                jobs.submit_job(self.db, message)
            else:
                raise PoisonMessageError(f"{message.TYPE} does not belong on the control queue")
        except (ConfigError, NotFoundError) as exc:
            raise PoisonMessageError(f"{message.TYPE} refused: {exc}") from exc
        self.relay.wake()

    def on_result(self, delivery: Delivery) -> None:
        """One message of the results queue (the batch handler's single-message form)."""
        (error,) = self.on_results([delivery])
        if error is not None:
            raise error

    def on_results(self, deliveries: Sequence[Delivery]) -> list[Exception | None]:
        """The messages of the results queue the consumer had in hand at once.

        Their deltas are validated and committed in one transaction (group commit: one disk sync
        for all of them), then their rounds are advanced; the broker layer acks each message only
        after this returned. Other messages (task failures, job results, heartbeats) are handled
        one by one. Returns, per message, the error that stops it (it is retried or
        dead-lettered) or None. If the deltas' transaction fails this raises: nothing of it was
        committed, and the broker layer handles each message again on its own.
        """
        errors: list[Exception | None] = [None] * len(deliveries)
        reports: list[tuple[DeltaReport, str | None]] = []
        sources: list[FileRegion | None] = []
        wake = False  # whether the outbox may have rows to send now
        for i, delivery in enumerate(deliveries):
            try:
                message: Message = decode(delivery.body)
                if isinstance(message, DeltaReport):
                    reports.append((message, delivery.user_id))
                    sources.append(_payload_region(delivery, message))
                else:
                    wake = True
                    self._on_other_result(message, delivery.user_id)
            except Exception as exc:
                errors[i] = exc
        if reports:
            wake = self._record_deltas(reports, sources) or wake
        if wake:
            self.relay.wake()
        return errors

    def _record_deltas(
        self, reports: list[tuple[DeltaReport, str | None]], sources: list[FileRegion | None]
    ) -> bool:
        """Record a batch's deltas and advance their rounds; False when no round was advanced
        (each was waiting for more answers), so nothing was written for the outbox relay."""
        outcomes = self.engine.record_deltas(reports, sources)
        for (report, _), outcome in zip(reports, outcomes, strict=True):
            logger.debug("delta for task %s: %s %s", report.task_id, outcome.status, outcome.reason)
        counts = Counter(outcome.status for outcome in outcomes)
        logger.info(
            "%d deltas committed: %s", len(outcomes), ", ".join(f"{n} {k}" for k, n in counts.items())
        )
        if any(outcome.status == "accepted" for outcome in outcomes):
            fault_point("coordinator-after-delta-commit")
        # a round that was waiting for more answers when its deltas committed is left to the ticker
        advanced = list(
            dict.fromkeys(o.round_id for o in outcomes if o.round_id is not None and not o.round_waits)
        )
        for round_id in advanced:
            if self.engine.advance(round_id) == "closed":
                fault_point("coordinator-after-aggregation-commit")
        return bool(advanced)

    def _on_other_result(self, message: Message, user_id: str | None) -> None:
        if isinstance(message, TaskFailed):
            if self.engine.record_failure(message, user_id):
                self.tick()
        elif isinstance(message, JobResult):
            jobs.record_result(self.db, message, user_id)
        elif isinstance(message, Heartbeat):
            self._heartbeat(message, user_id)
        else:
            raise PoisonMessageError(f"{message.TYPE} does not belong on the results queue")

    def _heartbeat(self, message: Heartbeat, user_id: str | None) -> None:
        if user_id != message.worker:
            logger.warning("heartbeat for %s sent by broker user %r ignored", message.worker, user_id)
            return
        with self.db.session(write=True) as session:
            worker = session.scalar(select(Worker).where(Worker.name == message.worker))
            if worker is not None:
                worker.last_seen_at = utcnow()
                worker.info = dict(message.info)

    def on_dead_task(self, delivery: Delivery) -> None:
        """A task the broker dead-lettered from a worker's queue (:data:`DEAD_TASKS_QUEUE`).

        Only the broker's own dead-lettering counts: it keeps the coordinator's ``user_id`` on
        the copy (the relay published the task), which nobody else can set. Copies a worker's
        consumer dead-lettered itself carry no ``user_id``: that worker sent TaskFailed already,
        and the copy stays in its dead-letter queue with the reason.
        """
        if delivery.user_id != self._broker_user:
            logger.debug("dead task copy from %r ignored (not the broker's)", delivery.user_id)
            return
        message: Message = decode(delivery.body)
        if not isinstance(message, TrainTask):
            return  # an apply job's task: its job shows no result, as before
        deaths = delivery.headers.get("x-death")
        latest = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
        reason = f"{latest.get('reason', 'dead-lettered')} in {latest.get('queue', 'its task queue')}"
        if self.engine.record_dead_task(message.task_id, reason):
            self.tick()

    def on_fetch(self, delivery: Delivery) -> None:
        request = decode(delivery.body, FetchModel)
        if not delivery.reply_to:
            raise PoisonMessageError("fetch-model without reply_to")
        try:
            release = self.release_body(request.model, request.version)
        except NotFoundError as exc:
            raise PoisonMessageError(str(exc)) from exc
        self.broker.publish(
            OutgoingMessage(
                exchange="",
                routing_key=delivery.reply_to,
                body=release.body,
                correlation_id=delivery.correlation_id,
                persistent=False,
                tail_offset=release.frame_offset,
                tail_sha256=release.weights_sha256,
            )
        )

    # ------------------------------------------------------------------------------- loop

    def tick(self) -> None:
        """Advance every open round (deadlines, quorums); the relay sends what that wrote."""
        for round_id in self.engine.open_round_ids():
            self.engine.advance(round_id)
        self.relay.wake()
        self.db.checkpoint()

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set (SIGTERM/SIGINT in the CLI)."""
        with self.db.session() as session:
            workers = tuple(session.scalars(select(Worker.name).where(Worker.status == "active")))
            sweep_blob_files(session)  # files of blobs whose transaction never committed
        self.broker.declare(fedmq_topology(workers))
        consumers = [
            self.broker.consumer(CONTROL_QUEUE, self.on_control, prefetch=1),
            self.broker.consumer(
                RESULTS_QUEUE,
                self.on_result,
                prefetch=RESULTS_PREFETCH,
                batch_handler=self.on_results,
                max_batch=RESULTS_BATCH,
                # deltas are decoded and validated whole: keep the large ones in memory as they
                # arrive instead of reading them back from the disk (common/broker/chunks.py)
                memory_budget=RESULTS_MEMORY_BUDGET,
            ),
            self.broker.consumer(FETCH_QUEUE, self.on_fetch, prefetch=1),
            self.broker.consumer(DEAD_TASKS_QUEUE, self.on_dead_task, prefetch=1),
        ]
        relay = threading.Thread(target=self.relay.run, args=(stop,), name="fedmq-outbox", daemon=True)
        relay.start()
        for consumer in consumers:
            consumer.start()
        self.ready.set()
        logger.info("coordinator running")
        try:
            while not stop.wait(self.tick_s):
                try:
                    self.tick()
                except DecodeError:
                    raise
                except Exception:
                    logger.exception("round ticker failed; retrying")
        finally:
            for consumer in consumers:
                consumer.stop()
            relay.join(timeout=10)
            self.broker.close()
            logger.info("coordinator stopped")


def _payload_region(delivery: Delivery, report: DeltaReport) -> FileRegion | None:
    """Where the weight frame of ``report`` lies in the reassembled file it was read from, if any:
    the payload is the body's tail (common/messages.py), so the blob store can link that file.
    A worker splits the transfer's digest where the frame starts: then the region comes with the
    frame's sha256, verified by the reassembler, and the blob store does not hash it again."""
    if delivery.path is None or not len(report.payload):
        return None
    offset = delivery.size - len(report.payload)
    tail = delivery.verified_tail
    sha256 = tail[1] if tail is not None and tail[0] == offset else None
    return FileRegion(delivery.path, offset, len(report.payload), sha256)
