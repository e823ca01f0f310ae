"""Simulated workers for `fedmq bench load`: protocol-level workers, many per process.

A simulated worker speaks the worker's protocol and nothing more: it skips fetching, verifying and
loading the model (the worker's cost, not the coordinator's, which is what the load benchmark
measures). It has its own AMQP connection as its own broker user (from its config file, as
``fedmq workers add`` writes it), so the broker validates the ``user_id`` of what it publishes. It
consumes its task queue (prefetch 1) and its release queue (releases are dropped), sends a
heartbeat once connected, and answers each :class:`~common.messages.TrainTask` with a valid
:class:`~common.messages.DeltaReport`: the task's ids and base version, a real sample count, and
codec-encoded random weights of the base version's layout, published to the results route with
``mandatory`` and publisher confirms. The task is acked only after the confirm, as the real worker
does; a body that is not a train task is rejected to the dead-letter queue.

Each worker is a thread with its own connection (pika's rule: one connection per thread); a
process runs many (``python -m coordinator.bench.simulated_workers SPEC``) until its stdin closes,
then writes what each worker received and had confirmed, for the benchmark's exactly-once oracle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from pika.adapters.blocking_connection import BlockingChannel

from common import codec
from common.broker.connection import close_quietly, connect
from common.broker.message import OutgoingMessage
from common.broker.publisher import message_properties
from common.broker.topology import RESULTS_EXCHANGE, RESULTS_ROUTE, worker_release_queue, worker_task_queue
from common.errors import DecodeError
from common.messages import DeltaReport, Heartbeat, Message, TrainTask, decode
from coordinator.bench.deploy import BenchDeployment
from worker.config import load_worker_config

logger = logging.getLogger(__name__)

SAMPLES = 16
DELTA_SCALE = 0.05  # large enough that one delta counted twice moves a mean far beyond float32 error

#: Shapes and dtypes of the model's weight arrays, as JSON carries them.
Layout = list[tuple[list[int], str]]


class SimulatedWorker(threading.Thread):
    """One protocol-level worker on its own connection (see the module docstring)."""

    def __init__(self, config_path: Path, layout: Layout, stop: threading.Event) -> None:
        self.config = load_worker_config(config_path)
        super().__init__(name=f"sim-{self.config.name}", daemon=True)
        self.layout = layout
        self.stop_event = stop
        self.rng = np.random.default_rng(zlib.crc32(self.config.name.encode()))
        self.started_up = threading.Event()
        self.received: list[str] = []  # task ids in delivery order: a redelivered task appears twice
        self.confirmed: list[str] = []  # task ids whose delta the broker confirmed
        self.releases = 0
        self.refused = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._serve()
        except Exception as exc:  # reported to the bench, which counts what it left undone
            self.error = f"{self.config.name}: {type(exc).__name__}: {exc}"
            logger.exception("simulated worker %s failed", self.config.name)
        finally:
            self.started_up.set()

    def _serve(self) -> None:
        name = self.config.name
        connection = connect(self.config.broker_config(), f"fedmq-bench-{name}")
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=1)
            channel.basic_consume(worker_task_queue(name), self._on_task)
            channel.basic_consume(worker_release_queue(name), self._on_release, auto_ack=True)
            self._send(channel, Heartbeat(worker=name, sent_at=time.time(), info={"simulated": True}))
            self.started_up.set()
            while not self.stop_event.is_set():
                connection.process_data_events(time_limit=0.5)
        finally:
            close_quietly(connection)

    def _send(self, channel: BlockingChannel, message: Message) -> None:
        """Publish to the results route; returns once the broker confirmed (pika raises otherwise)."""
        body = message.encode()
        outgoing = OutgoingMessage(RESULTS_EXCHANGE, RESULTS_ROUTE, body, message_id=uuid.uuid4().hex)
        properties = message_properties(outgoing, self.config.name, {})
        channel.basic_publish(RESULTS_EXCHANGE, RESULTS_ROUTE, body, properties=properties, mandatory=True)

    def _on_release(self, channel: BlockingChannel, method: Any, properties: Any, body: bytes) -> None:
        self.releases += 1  # taken and dropped: a simulated worker never loads the model

    def _on_task(self, channel: BlockingChannel, method: Any, properties: Any, body: bytes) -> None:
        try:
            task = decode(body, TrainTask)
        except DecodeError:
            self.refused += 1
            channel.basic_reject(method.delivery_tag, requeue=False)  # to the dead-letter queue
            return
        self.received.append(task.task_id)
        delta = [
            self.rng.normal(0.0, DELTA_SCALE, shape).astype(dtype)
            if np.issubdtype(np.dtype(dtype), np.floating)
            else np.zeros(shape, dtype)
            for shape, dtype in self.layout
        ]
        report = DeltaReport(
            task_id=task.task_id,
            round_id=task.round_id,
            worker=self.config.name,
            model=task.model,
            base_version=task.version,
            base_weights_sha256=task.weights_sha256,
            sample_count=SAMPLES,
            metrics={"loss": 1.0},
            payload=codec.encode_weights(delta),
        )
        self._send(channel, report)
        self.confirmed.append(task.task_id)
        channel.basic_ack(method.delivery_tag)

    def report(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "received": self.received,
            "confirmed": self.confirmed,
            "releases": self.releases,
            "refused": self.refused,
            "error": self.error,
        }


def _stop_at_end_of_input(stop: threading.Event) -> None:
    """The bench closes a simulator's stdin to stop it (and so does the bench's death)."""
    sys.stdin.buffer.read()
    stop.set()


def serve_simulated_workers(spec_path: Path) -> None:
    """A simulator process: run the spec's workers until stdin closes (or SIGTERM); write reports."""
    spec = json.loads(spec_path.read_text())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    layout = [(list(shape), str(dtype)) for shape, dtype in spec["layout"]]
    workers = [SimulatedWorker(Path(p), layout, stop) for p in spec["configs"]]
    for worker in workers:
        worker.start()
    threading.Thread(target=_stop_at_end_of_input, args=(stop,), daemon=True).start()
    stop.wait()
    for worker in workers:
        worker.join(timeout=30)
    Path(spec["results"]).write_text(json.dumps([w.report() for w in workers]))


class Simulators:
    """The simulator processes of one bench run; :meth:`stop` ends them and collects their reports."""

    def __init__(self, dep: BenchDeployment, names: list[str], per_process: int, layout: Layout) -> None:
        self.dep = dep
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        for i in range(0, len(names), per_process):
            key = f"simulators-{i // per_process}"
            spec = dep.root / f"{key}.json"
            results = dep.root / f"{key}.results.json"
            configs = [str(dep.workers[n].config_path) for n in names[i : i + per_process]]
            spec.write_text(json.dumps({"configs": configs, "layout": layout, "results": str(results)}))
            with open(dep.root / f"{key}.log", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "coordinator.bench.simulated_workers", str(spec)],
                    cwd=dep.root,
                    env=dep.env(),
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            self.procs.append((proc, results))

    def check(self) -> None:
        """Raise with its log's tail when a simulator process exited before it was told to."""
        for i, (proc, _) in enumerate(self.procs):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"simulators-{i} exited with {proc.returncode}:\n{self.dep.log_tail(f'simulators-{i}')}"
                )

    def stop(self) -> list[dict[str, Any]]:
        """Close every simulator's stdin (its signal to stop), wait, and return the workers' reports."""
        for proc, _ in self.procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        reports: list[dict[str, Any]] = []
        for proc, results in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if results.exists():
                reports.extend(json.loads(results.read_text()))
        self.procs.clear()
        return reports


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve_simulated_workers(Path(sys.argv[1]))
