"""`fedmq bench intake`: deltas per second the coordinator accepts vs raw RabbitMQ throughput.

Set-up (not timed): a private RabbitMQ node, SQLite, a tiny registered model, ``workers`` workers
(each its own broker user), and one open round holding ``2 * deltas`` pending tasks spread over
those workers (the run is started through :class:`~coordinator.rounds.RoundEngine`, the extra tasks
are added in SQL; a few of the run's own tasks stay unanswered so the round never closes while it is
measured). One valid :class:`~common.messages.DeltaReport` body is prepared per task.

Two measurements, each of fedmq against raw RabbitMQ on the same broker with the same bodies:

- *live* (the headline, "publish/consume throughput"): the ``workers`` publishers send their
  share at the same time (one thread and connection each, a confirm per message: the publisher
  code the workers use) while the consumer runs. Raw: the bodies go to a plain quorum queue read by
  a bare pika consumer with the coordinator's results settings (prefetch
  :data:`~coordinator.service.RESULTS_PREFETCH`, one ack per message) that does nothing else.
  fedmq: the publishers use their workers' credentials (the broker checks ``user_id``) and send to
  the results exchange; the running coordinator decodes, validates and commits the deltas in SQL
  (those it holds at once in one transaction) and acks each after the commit. Rate: messages over
  the time from the first publish to the last message consumed (raw) or committed (fedmq).
- *drain* (the strict reading): the other ``deltas`` bodies already wait in the queue when the
  consumer starts; rate over first to last message consumed or committed. The raw consumer here
  is bounded by nothing but the broker and pika (it does no work per message), so this ratio is
  how much of the broker's bare delivery rate the coordinator's decoding, validation and SQL
  commits keep.

Rates are (n - 1) / elapsed. Target (issue 4): >= 0.5x; both ratios are checked against it and
reported (``target_met`` for live, ``drain_target_met`` for drain).
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import os
import queue
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    raw_live_per_s: float  # publishers and a bare consumer at once
    coordinator_live_per_s: float  # the same publishers (workers' credentials) and the coordinator
    ratio: float  # coordinator_live / raw_live: the headline
    raw_drain_per_s: float  # a bare consumer emptying a full queue
    coordinator_drain_per_s: float  # the coordinator emptying a full results queue
    drain_ratio: float
    worker_publish_per_s: float  # one worker alone, confirm per message
    target: float
    target_met: bool
    drain_target_met: bool  # the same target against the bare consumer of a full queue
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
        started = time.perf_counter()
        for body in bodies:
            broker.publish(
                OutgoingMessage(
                    exchange=exchange, routing_key=routing_key, body=body, message_id=uuid.uuid4().hex
                )
            )
        return time.perf_counter() - started
    finally:
        broker.close()


def _publish_all(senders: list[tuple[str, list[bytes]]], exchange: str, routing_key: str) -> float:
    """Each (AMQP URL, bodies) published by its own thread at once; returns the wall-clock start."""
    started = time.time()
    with ThreadPoolExecutor(max_workers=len(senders)) as pool:
        futures = [
            pool.submit(_publish, url, exchange, routing_key, bodies, f"fedmq-bench-{i}")
            for i, (url, bodies) in enumerate(senders)
        ]
        for future in futures:
            future.result()
    return started


def _raw_consume(amqp_url: str, expected: int, ready: Any, results: Any) -> None:
    """A bare pika consumer of :data:`RAW_QUEUE` (prefetch as the coordinator's results) that
    stamps each message and acks it; sends the stamps after ``expected`` messages. Runs in its own
    process, as the coordinator does, so it does not share an interpreter with the publishers."""
    stamps: list[float] = []
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=RESULTS_PREFETCH)

        def on_message(ch: object, method: pika.spec.Basic.Deliver, props: object, body: bytes) -> None:
            channel.basic_ack(method.delivery_tag)
            stamps.append(time.time())
            if len(stamps) == expected:
                channel.stop_consuming()

        channel.basic_consume(RAW_QUEUE, on_message)
        ready.set()
        channel.start_consuming()
    results.put(stamps)


class _RawConsumer:
    """:func:`_raw_consume` in a child process."""

    def __init__(self, amqp_url: str, expected: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.expected = expected
        self.ready = context.Event()
        self.results: Any = context.Queue()
        self.process = context.Process(
            target=_raw_consume, args=(amqp_url, expected, self.ready, self.results), daemon=True
        )

    def start(self, timeout_s: float = 60.0) -> None:
        self.process.start()
        if not self.ready.wait(timeout_s):
            self.process.kill()
            raise TimeoutError("the raw consumer did not start")

    def finish(self, timeout_s: float) -> list[float]:
        try:
            stamps: list[float] = self.results.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"the raw consumer did not get {self.expected} messages") from None
        finally:
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
        return stamps


def _raw_rates(
    amqp_url: str, senders: list[tuple[str, list[bytes]]], drain: list[bytes]
) -> tuple[float, float]:
    """(live, drain) rates of raw RabbitMQ: see the module docstring."""
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().queue_declare(RAW_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    live_count = sum(len(bodies) for _, bodies in senders)
    consumer = _RawConsumer(amqp_url, live_count)
    consumer.start()
    started = _publish_all(senders, "", RAW_QUEUE)
    live = _rate(live_count + 1, consumer.finish(120.0 + live_count / 100)[-1] - started)
    _publish_all([(amqp_url, drain)], "", RAW_QUEUE)
    consumer = _RawConsumer(amqp_url, len(drain))
    consumer.start()
    stamps = consumer.finish(120.0 + len(drain) / 100)
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().queue_delete(RAW_QUEUE)
    return live, _rate(len(stamps), stamps[-1] - stamps[0])


def _results_queue(amqp_url: str) -> tuple[int, int]:
    """(messages, consumers) of the results queue."""
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        frame = connection.channel().queue_declare(RESULTS_QUEUE, passive=True)
        return int(frame.method.message_count), int(frame.method.consumer_count)


def _accepted_stamps(dep: BenchDeployment) -> list[float]:
    with dep.database() as db, db.session() as session:
        stamps = session.scalars(
            select(Delta.received_at).where(Delta.status == "accepted").order_by(Delta.id)
        )
        return [(t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp() for t in stamps]


def _wait_accepted(dep: BenchDeployment, count: int) -> list[float]:
    dep.wait_for(
        f"{count} deltas to be accepted and acked",
        lambda: len(_accepted_stamps(dep)) >= count and _results_queue(dep.settings.amqp_url)[0] == 0,
        timeout_s=120.0 + count / 10,
    )
    return _accepted_stamps(dep)


def run_intake_benchmark(
    deltas: int = 2000,
    workers: int = 4,
    workdir: Path | None = None,
    progress: Progress = lambda line: None,
) -> IntakeBenchResult:
    """Measure raw and coordinator rates, live and drained (see the module docstring)."""
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="fedmq-bench-intake-") as tmp:
        base = workdir or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)  # the RabbitMQ node runs as its own user below it
        with BenchDeployment.start(base / "fedmq") as dep:
            dep.register("intake", make_linear_model(*MODEL_SHAPE, model_id="intake"))
            names = [f"w{i}" for i in range(workers)]
            progress(f"adding {workers} workers; opening a round with {2 * deltas} tasks")
            for name in names:
                dep.add_worker(name)
            bodies = _open_round_with_tasks(dep, names, 2 * deltas)
            live, drain = bodies[:deltas], bodies[deltas:]
            url = dep.settings.amqp_url
            progress(
                f"raw: {deltas} bodies of {len(bodies[0][1])} bytes live from {workers} publishers, then drained"
            )
            raw_live, raw_drain = _raw_rates(
                url, [(url, [b for w, b in live if w == n]) for n in names], [b for _, b in drain]
            )
            progress(f"fedmq: the coordinator takes {deltas} deltas live from {workers} workers")
            dep.start_coordinator()
            dep.wait_for("the coordinator to consume results", lambda: _results_queue(url)[1] > 0)
            started = _publish_all(
                [(dep.workers[n].amqp_url, [b for w, b in live if w == n]) for n in names],
                RESULTS_EXCHANGE,
                RESULTS_ROUTE,
            )
            coordinator_live = _rate(deltas + 1, _wait_accepted(dep, deltas)[-1] - started)
            progress(f"fedmq: {deltas} deltas waiting when the coordinator starts")
            dep.stop_processes()
            publish_s = [
                _rate(len(own), _publish(dep.workers[n].amqp_url, RESULTS_EXCHANGE, RESULTS_ROUTE, own, n))
                for n in names
                if (own := [b for w, b in drain if w == n])
            ]
            dep.start_coordinator()
            stamps = _wait_accepted(dep, 2 * deltas)[deltas:]
    coordinator_drain = _rate(len(stamps), stamps[-1] - stamps[0])
    ratio = coordinator_live / raw_live
    return IntakeBenchResult(
        deltas=deltas,
        workers=workers,
        body_bytes=len(bodies[0][1]),
        raw_live_per_s=raw_live,
        coordinator_live_per_s=coordinator_live,
        ratio=ratio,
        raw_drain_per_s=raw_drain,
        coordinator_drain_per_s=coordinator_drain,
        drain_ratio=coordinator_drain / raw_drain,
        worker_publish_per_s=statistics.mean(publish_s),
        target=TARGET,
        target_met=ratio >= TARGET,
        drain_target_met=coordinator_drain / raw_drain >= TARGET,
        load_average=os.getloadavg()[0],
    )
