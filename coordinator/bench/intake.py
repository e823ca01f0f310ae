"""`fedmq bench intake`: deltas per second the coordinator accepts vs raw RabbitMQ throughput.

Set-up (not timed): a private RabbitMQ node, SQLite, a tiny registered model, ``workers`` workers
(each its own broker user), and one open round holding ``deltas`` pending tasks spread over those
workers (the run is started through :class:`~coordinator.rounds.RoundEngine`, the extra tasks are
added in SQL; a few of the run's own tasks stay unanswered so the round never closes while it is
measured). One valid :class:`~common.messages.DeltaReport` body is prepared per task.

Measured, on the same broker with the same bodies:

- *raw*: the bodies published (confirm per message, the same publisher code the workers use) to a
  plain quorum queue, then consumed by a bare pika consumer with the coordinator's settings for
  its results queue (prefetch :data:`~coordinator.service.RESULTS_PREFETCH`, one ack per message)
  that does nothing else.
- *coordinator*: the bodies published by their workers (each with its own credentials, so the
  broker validates ``user_id``) to the results queue, then the coordinator process started: it
  decodes, validates and commits the deltas in SQL (the ones it holds at once in one transaction)
  and acks each after the commit. Its rate comes from the delta rows'
  commit timestamps; the run waits until the results queue is empty (every delta acked).

Rates are over first to last message, (n - 1) / elapsed. The headline ratio is coordinator intake
over raw consume (both drain a queue that already holds every message); the ratio to the raw
publish rate is also reported (what a publisher can feed). Target (issue 4): >= 0.5x.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pika
from sqlalchemy import select

from common import codec
from common.broker import BrokerConfig, OutgoingMessage, RabbitmqBroker
from common.broker.topology import RESULTS_EXCHANGE, RESULTS_QUEUE, RESULTS_ROUTE
from common.messages import DeltaReport, StartRun
from common.model.numpy_model import make_linear_model
from coordinator.bench.deploy import BenchDeployment, sigterm_as_interrupt
from coordinator.control import new_id
from coordinator.db.models import Delta, ModelVersion, Round, Task, Worker
from coordinator.registry import KeySigner, ModelRegistry
from coordinator.rounds import RoundEngine
from coordinator.service import RESULTS_PREFETCH

logger = logging.getLogger(__name__)

TARGET = 0.5
MODEL_SHAPE = (32, 10)
RAW_QUEUE = "fedmq.bench.raw"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class IntakeBenchResult:
    """Figures of one run; rates in messages (deltas) per second."""

    deltas: int
    workers: int
    body_bytes: int
    raw_publish_per_s: float
    raw_consume_per_s: float
    worker_publish_per_s: float
    coordinator_per_s: float
    ratio: float
    publish_ratio: float
    target: float
    target_met: bool
    prefetch: int = RESULTS_PREFETCH  # the coordinator's results prefetch, and the raw consumer's
    load_average: float = 0.0  # 1-minute load average at the end: other work on the machine skews figures


def _rate(count: int, seconds: float) -> float:
    return (count - 1) / seconds if seconds > 0 and count > 1 else float("nan")


def _open_round_with_tasks(dep: BenchDeployment, names: list[str], deltas: int) -> list[tuple[str, bytes]]:
    """Start a run, add ``deltas`` tasks to its round; return (worker, DeltaReport body) per task."""
    with dep.database() as db:
        engine = RoundEngine(db, ModelRegistry(db, KeySigner.from_settings(dep.settings)))
        run_id = new_id()
        engine.start_run(
            StartRun(
                run_id=run_id,
                model="intake",
                rounds=1,
                min_workers=len(names),
                deadline_s=24 * 3600.0,
                workers=names,
            )
        )
        rng = np.random.default_rng(0)
        bodies: list[tuple[str, bytes]] = []
        with db.session(write=True) as session:
            round_ = session.scalar(select(Round).where(Round.run_id == run_id))
            assert round_ is not None
            base = session.get(ModelVersion, round_.base_version_id)
            assert base is not None
            workers = list(
                session.scalars(select(Worker).where(Worker.name.in_(names)).order_by(Worker.name))
            )
            now = dt.datetime.now(dt.UTC)
            for i in range(deltas):
                worker = workers[i % len(workers)]
                task_id = uuid.uuid4().hex
                session.add(
                    Task(
                        task_id=task_id, round_id=round_.id, worker_id=worker.id, state="pending", sent_at=now
                    )
                )
                delta = [rng.normal(0, 0.01, size=MODEL_SHAPE).astype("float32"), np.zeros(10, "float32")]
                report = DeltaReport(
                    task_id=task_id,
                    round_id=round_.id,
                    worker=worker.name,
                    model="intake",
                    base_version=base.version,
                    base_weights_sha256=base.weights_sha256,
                    sample_count=16,
                    metrics={"loss": 1.0},
                    payload=codec.encode_weights(delta),
                )
                bodies.append((worker.name, report.encode()))
    return bodies


def _publish(amqp_url: str, exchange: str, routing_key: str, bodies: list[bytes], name: str) -> float:
    """Publish ``bodies`` one by one with confirms (fedmq's publisher); return the elapsed seconds."""
    broker = RabbitmqBroker(BrokerConfig(amqp_url=amqp_url), name=name, connect_deadline_s=30)
    try:
        broker.publish(OutgoingMessage(exchange=exchange, routing_key=routing_key, body=bodies[0]))
        started = time.perf_counter()
        for body in bodies[1:]:
            broker.publish(
                OutgoingMessage(
                    exchange=exchange, routing_key=routing_key, body=body, message_id=uuid.uuid4().hex
                )
            )
        return time.perf_counter() - started
    finally:
        broker.close()


def _raw_baseline(amqp_url: str, bodies: list[bytes]) -> tuple[float, float]:
    """(publish, consume) rates of ``bodies`` through a plain quorum queue."""
    params = pika.URLParameters(amqp_url)
    with pika.BlockingConnection(params) as connection:
        channel = connection.channel()
        channel.queue_declare(RAW_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        publish_s = _publish(amqp_url, "", RAW_QUEUE, bodies, "fedmq-bench-raw")
        channel.basic_qos(prefetch_count=RESULTS_PREFETCH)
        stamps: list[float] = []

        def on_message(ch: object, method: pika.spec.Basic.Deliver, props: object, body: bytes) -> None:
            channel.basic_ack(method.delivery_tag)
            stamps.append(time.perf_counter())
            if len(stamps) == len(bodies):
                channel.stop_consuming()

        channel.basic_consume(RAW_QUEUE, on_message)
        channel.start_consuming()
        channel.queue_delete(RAW_QUEUE)
    return _rate(len(bodies), publish_s), _rate(len(stamps), stamps[-1] - stamps[0])


def _results_depth(amqp_url: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        frame = connection.channel().queue_declare(RESULTS_QUEUE, passive=True)
        return int(frame.method.message_count)


def _accepted_stamps(dep: BenchDeployment) -> list[dt.datetime]:
    with dep.database() as db, db.session() as session:
        return list(
            session.scalars(select(Delta.received_at).where(Delta.status == "accepted").order_by(Delta.id))
        )


def run_intake_benchmark(
    deltas: int = 2000,
    workers: int = 4,
    workdir: Path | None = None,
    progress: Progress = lambda line: None,
) -> IntakeBenchResult:
    """Measure raw and coordinator rates (see the module docstring)."""
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="fedmq-bench-intake-") as tmp:
        base = workdir or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)  # the RabbitMQ node runs as its own user below it
        with BenchDeployment.start(base / "fedmq") as dep:
            dep.register("intake", make_linear_model(*MODEL_SHAPE, model_id="intake"))
            names = [f"w{i}" for i in range(workers)]
            progress(f"adding {workers} workers; opening a round with {deltas} tasks")
            for name in names:
                dep.add_worker(name)
            bodies = _open_round_with_tasks(dep, names, deltas)
            progress(f"raw: {deltas} bodies of {len(bodies[0][1])} bytes through a plain quorum queue")
            raw_publish, raw_consume = _raw_baseline(dep.settings.amqp_url, [b for _, b in bodies])
            progress(f"workers publish {deltas} deltas to the results queue")
            publish_s = []
            for name in names:
                own = [b for w, b in bodies if w == name]
                seconds = _publish(dep.workers[name].amqp_url, RESULTS_EXCHANGE, RESULTS_ROUTE, own, name)
                publish_s.append(_rate(len(own), seconds))
            progress("coordinator: accepting the deltas")
            dep.start_coordinator()
            dep.wait_for(
                "every delta to be accepted and acked",
                lambda: len(_accepted_stamps(dep)) >= deltas and _results_depth(dep.settings.amqp_url) == 0,
                timeout_s=120.0 + deltas / 10,
            )
            stamps = _accepted_stamps(dep)
    coordinator = _rate(len(stamps), (stamps[-1] - stamps[0]).total_seconds())
    ratio = coordinator / raw_consume
    return IntakeBenchResult(
        deltas=deltas,
        workers=workers,
        body_bytes=len(bodies[0][1]),
        raw_publish_per_s=raw_publish,
        raw_consume_per_s=raw_consume,
        worker_publish_per_s=statistics.mean(publish_s),
        coordinator_per_s=coordinator,
        ratio=ratio,
        publish_ratio=coordinator / raw_publish,
        target=TARGET,
        target_met=ratio >= TARGET,
        load_average=os.getloadavg()[0],
    )
