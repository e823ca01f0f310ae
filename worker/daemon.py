"""The worker daemon: receives tasks, trains on local data, returns deltas; applies models for jobs.

Per task (prefetch 1, off pika's I/O thread): get the named version (cache, the releases fanout,
or a fetch), verify it, compile it, learn with the model's own ``incremental_learn_function``,
publish ``delta = trained - base`` with the base version, sample count and metrics, and only when
the broker confirmed that publish return — which acks the task. A crash anywhere before that
leaves the task unacked: RabbitMQ gives it back when the worker restarts.

A task this worker can never do (a release that fails verification, data that does not fit the
model) is answered with ``TaskFailed`` so the round need not wait for its deadline. A task whose
model code crashes is retried by the broker layer and dead-lettered after the delivery limit.

``SIGTERM`` stops taking tasks and finishes the current one (the CLI wires the signal to ``stop``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid

from common import codec
from common.broker import Broker, Delivery, OutgoingMessage
from common.broker.topology import (
    FETCH_ROUTE,
    RESULTS_EXCHANGE,
    RESULTS_ROUTE,
    worker_release_queue,
    worker_task_queue,
)
from common.errors import BrokerError, FedmqError, PoisonMessageError, SignatureError
from common.faults import fault_point
from common.messages import (
    ApplyTask,
    DeltaReport,
    FetchModel,
    Heartbeat,
    JobResult,
    Message,
    TaskFailed,
    TrainTask,
    decode,
)
from common.model import DynamicDLModel
from common.release import VerifiedRelease
from worker import trainer
from worker.config import WorkerConfig
from worker.data import LocalData
from worker.models import ModelStore

logger = logging.getLogger(__name__)

# Bytes of releases in flight kept in memory as they arrive; a larger one is read back from its file.
RELEASE_MEMORY_BUDGET = 1024 * 1024 * 1024


def prepare_devices() -> None:
    """Before any model code runs: if a model loads TensorFlow, it grows GPU memory as needed
    (``TF_FORCE_GPU_ALLOW_GROWTH``, read by TensorFlow when it initialises its GPUs), so several
    workers or other programs can share a GPU. TensorFlow itself is not imported here."""
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")


def device_info() -> dict[str, object]:
    """What the worker trains on: the GPUs TensorFlow sees, else the CPU.

    TensorFlow is asked only once model code has imported it: a worker that runs numpy models
    never imports it (importing it costs seconds and a large share of memory).
    """
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return {"device": "cpu"}
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: TF_FORCE_GPU_ALLOW_GROWTH applied then
            pass
    if gpus:
        return {"device": "gpu", "gpus": [g.name for g in gpus]}
    return {"device": "cpu", "framework": "tensorflow"}


class WorkerDaemon:
    def __init__(self, config: WorkerConfig, broker: Broker, data: LocalData | None) -> None:
        self.config = config
        self.broker = broker
        self.data = data
        self.store = ModelStore(config.cache_path(), config.public_key(), config.cache_versions)
        self.ready = threading.Event()
        self.tasks_done = 0
        self.info: dict[str, object] = {"device": "cpu"}
        broker_config = getattr(broker, "config", None)
        self.max_attempts = int(getattr(broker_config, "max_delivery_attempts", 5))
        prepare_devices()

    def _load(self, release: VerifiedRelease) -> DynamicDLModel:
        model = self.store.load(release)
        info = device_info()
        if info != self.info:
            self.info = info
            logger.info("worker %s trains on %s", self.config.name, info)
        return model

    # ------------------------------------------------------------------------- publishing

    def _send(
        self,
        message: Message,
        routing_key: str = RESULTS_ROUTE,
        reply_to: str | None = None,
        frame: codec.WeightFrame | None = None,
    ) -> None:
        body = message.encode() if frame is None else message.encode_with_frame(frame)
        self.broker.publish(
            OutgoingMessage(
                exchange=RESULTS_EXCHANGE,
                routing_key=routing_key,
                body=body,
                message_id=uuid.uuid4().hex,
                reply_to=reply_to,
                # a chunked delta's digest is split where its frame starts: the coordinator gets
                # the frame's verified sha256 (its blob's) without hashing 100 MB once more
                tail_offset=0 if frame is None else len(body) - frame.nbytes,
            )
        )

    def _fetch(self, model: str, version: int) -> None:
        logger.info("fetching %s v%d from the coordinator", model, version)
        self._send(
            FetchModel(model=model, version=version),
            routing_key=FETCH_ROUTE,
            reply_to=worker_release_queue(self.config.name),
        )

    # --------------------------------------------------------------------------- handlers

    def on_release(self, delivery: Delivery) -> None:
        try:
            self.store.add(delivery.body, source=delivery.path, verified_tail=delivery.verified_tail)
        except SignatureError as exc:
            raise PoisonMessageError(f"release refused: {exc}") from exc

    def on_task(self, delivery: Delivery) -> None:
        message: Message = decode(delivery.body)
        try:
            if isinstance(message, TrainTask):
                self._train(message)
            elif isinstance(message, ApplyTask):
                self._apply(message)
            else:
                raise PoisonMessageError(f"{message.TYPE} is not a task")
        except Exception as exc:
            # The broker layer retries a failing task and dead-letters it after the last attempt;
            # on that attempt, tell the coordinator so the round need not wait for its deadline.
            if isinstance(message, TrainTask) and delivery.attempts >= self.max_attempts:
                reason = f"failed {delivery.attempts} times, dead-lettered: {type(exc).__name__}: {exc}"
                self._send(TaskFailed(task_id=message.task_id, worker=self.config.name, reason=reason[:2000]))
            raise
        self.tasks_done += 1

    def _train(self, task: TrainTask) -> None:
        if self.data is None:
            self._send(TaskFailed(task_id=task.task_id, worker=self.config.name, reason="no local data"))
            return
        try:
            release = self.store.get(
                task.model,
                task.version,
                task.weights_sha256,
                self._fetch,
                self.config.fetch_timeout_s,
                broadcast_wait_s=self.config.broadcast_wait_s,
            )
        except FedmqError as exc:  # refused, or never arrived: this task cannot be done here
            self._send(
                TaskFailed(task_id=task.task_id, worker=self.config.name, reason=f"no usable release: {exc}")
            )
            return
        model = self._load(release)
        logger.info("task %s: training %s v%d", task.task_id, task.model, task.version)
        started = time.perf_counter()
        result = trainer.train(model, self.data, task.train)
        report = DeltaReport(
            task_id=task.task_id,
            round_id=task.round_id,
            worker=self.config.name,
            model=task.model,
            base_version=task.version,
            base_weights_sha256=task.weights_sha256,
            sample_count=result.sample_count,
            metrics={**result.metrics, "task_seconds": time.perf_counter() - started},
        )
        # The frame is written straight into the body: one copy of the delta, not two.
        self._send(report, frame=codec.layout_frame(result.delta))  # confirmed; then the task is acked
        fault_point("worker-after-delta-publish")
        logger.info("task %s: delta against %s v%d sent", task.task_id, task.model, task.version)

    def _apply(self, job: ApplyTask) -> None:
        try:
            release = self.store.get(
                job.model, job.version, job.weights_sha256, self._fetch, self.config.fetch_timeout_s
            )
            inputs = codec.decode_weights(job.payload)
            outputs = trainer.apply(self._load(release), inputs)
            frame = codec.encode_weights(outputs)
            self._send(JobResult(job_id=job.job_id, worker=self.config.name, payload=frame))
        except FedmqError as exc:
            self._send(JobResult(job_id=job.job_id, worker=self.config.name, error=str(exc)))

    # ------------------------------------------------------------------------------- loop

    def heartbeat(self) -> None:
        samples = len(self.data) if self.data is not None else 0
        self._send(
            Heartbeat(worker=self.config.name, sent_at=time.time(), info={**self.info, "samples": samples})
        )

    def run(self, stop: threading.Event) -> None:
        consumers = [
            # A release is verified (signature, sha256) whenever it is used, from here or from the
            # cache, and the coordinator sends it again on request: its chunks need no fsync. It is
            # kept in memory as it arrives (decoded from there, its file written past the page
            # cache and linked into the model cache: common/broker/chunks.py).
            self.broker.consumer(
                worker_release_queue(self.config.name),
                self.on_release,
                prefetch=4,
                max_batch=4,
                durable_chunks=False,
                memory_budget=RELEASE_MEMORY_BUDGET,
            ),
            self.broker.consumer(worker_task_queue(self.config.name), self.on_task, prefetch=1),
        ]
        for consumer in consumers:
            consumer.start()
        self.ready.set()
        logger.info("worker %s running", self.config.name)
        try:
            while True:
                try:
                    self.heartbeat()
                except BrokerError as exc:
                    logger.warning("heartbeat not sent: %s", exc)
                if stop.wait(self.config.heartbeat_s):
                    break
        finally:
            for consumer in reversed(consumers):
                consumer.stop()
            self.broker.close()
            logger.info("worker %s stopped after %d tasks", self.config.name, self.tasks_done)
