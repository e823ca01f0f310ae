"""`fedmq bench load`: many simulated workers for many rounds against one coordinator.

Set-up (not timed): a :class:`~coordinator.bench.deploy.BenchDeployment` (private RabbitMQ node,
SQLite, keys), a tiny registered model (a 32x10 linear model, so the figures are coordination, not
maths), ``workers`` workers added in one go by :func:`~coordinator.workers.add_workers` (each its
own broker user with the least-privilege permissions, its queues, SQL row and config file), and
the coordinator as its own process (``fedmq coordinator run``). Then one FedAvg run of ``rounds``
rounds over every worker is submitted through the control queue.

The workers are simulated (:mod:`coordinator.bench.simulated_workers`): protocol-level workers that
skip loading the model but answer every task with a valid delta, each on its own connection as its
own broker user, with publisher confirms and the task acked after the confirm; ``per_process`` of
them run as threads in one process.

Measured: deltas accepted per second (first round opened to last round closed, from SQL); p50 and
p99 round latency (each round's ``created_at`` to ``closed_at``; p99 interpolates between rounds);
the coordinator's peak memory (``VmHWM`` of its process, read before it stops); messages in the
dead-letter queues and messages left in task, results and control queues (asked of each queue).

Exactly-once oracle: :func:`coordinator.audit.audit_rounds` (the same audit every fault test ends
with) over the run, given the tasks whose delta the broker confirmed to a simulated worker. A
delta no version counts (or a confirmed one that never reached SQL) is *lost*, one counted twice
*duplicated*, a version that is not FedAvg of its deltas *mismatched*, a version that is not whole
or not one per closed round a *bad version*. The bench also expects every task of the run to end
in a version (quorum is every worker): a task left unanswered, or a delta left pending or dropped
with a failed round, counts as lost here.

Target (issue 6): zero lost, zero duplicated, zero dead-lettered. A missed target does not fail the
command, but a lost or duplicated delta (or a version that is not FedAvg of its deltas) breaks the
design's invariant: the CLI then exits 1.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pika
from sqlalchemy import func, select

from common import codec
from common.broker.topology import fedmq_topology, with_dead_letter_queues, worker_release_queue
from common.messages import StartRun
from common.model.numpy_model import make_linear_model
from coordinator.audit import audit_rounds
from coordinator.bench.deploy import BenchDeployment, sigterm_as_interrupt
from coordinator.bench.simulated_workers import Layout, Simulators
from coordinator.control import new_id, submit
from coordinator.db import Database
from coordinator.db.blobs import read_blob
from coordinator.db.models import Delta, ModelVersion, OutboxMessage, Round, Run
from coordinator.workers import add_workers

logger = logging.getLogger(__name__)

MODEL = "load"
MODEL_SHAPE = (32, 10)
ACCEPTED = ("accepted", "aggregated")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LoadBenchResult:
    """Figures of one run; times in seconds, memory in MB."""

    run_id: str
    workers: int
    rounds: int
    processes: int
    setup_s: float  # adding the workers: users, permissions, queues, rows, configs
    run_state: str
    tasks: int
    publishes_confirmed: int  # delta publishes the broker confirmed to the simulated workers
    deltas_confirmed: int  # distinct tasks among them
    deltas_accepted: int
    deltas_rejected: int
    deltas_per_s: float
    round_latency_s: list[float]
    p50_round_s: float
    p99_round_s: float
    coordinator_peak_mb: float
    dead_lettered: int
    messages_left: int  # ready in task, results, control and fetch queues at the end
    redelivered_tasks: int
    lost: int
    duplicated: int
    rounds_mismatched: int  # versions that are not FedAvg of the deltas they count
    bad_versions: int  # versions not whole, or not one per closed round
    oracle_ok: bool
    target_met: bool
    worker_errors: list[str] = field(default_factory=list)
    queues_not_empty: dict[str, int] = field(default_factory=dict)  # ready messages at the end
    oracle_problems: list[str] = field(default_factory=list)  # what the audit found (first 20)
    load_average: float = 0.0


def peak_memory_mb(pid: int) -> float:
    """``VmHWM`` (peak resident set) of process ``pid`` in MB; NaN when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def queue_depths(amqp_url: str, names: list[str]) -> dict[str, int]:
    """Ready messages in each non-empty queue of the deployment (releases excepted), by queue name.

    A passive declare asks each queue itself: ``rabbitmqctl list_queues`` serves statistics that can
    be seconds old. Messages a live consumer holds unacked are not counted (they are in hand).
    """
    releases = {worker_release_queue(name) for name in names}  # the last one may still be on its way
    queues = [q.name for q in with_dead_letter_queues(fedmq_topology(tuple(names))).queues]
    depths: dict[str, int] = {}
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        for queue in queues:
            if queue not in releases:
                depths[queue] = channel.queue_declare(queue, passive=True).method.message_count
    return {name: n for name, n in depths.items() if n}


def base_layout(db: Database) -> Layout:
    """Shapes and dtypes of the bench model's first version: what every delta must match."""
    with db.session() as session:
        version = session.scalar(select(ModelVersion).order_by(ModelVersion.id).limit(1))
        assert version is not None
        weights = codec.decode_weights(read_blob(session, version.weights_blob_id))
    return [(list(w.shape), str(w.dtype)) for w in weights]


def round_figures(db: Database, run_id: str) -> tuple[str, list[float], float]:
    """(run state, each closed round's latency, accepted deltas per second over the run)."""
    with db.session() as session:
        state = session.scalar(select(Run.state).where(Run.run_id == run_id)) or "not recorded"
        rounds = list(session.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.number)))
        closed = [r for r in rounds if r.state == "closed" and r.closed_at is not None]
        accepted = session.scalar(
            select(func.count()).where(Delta.round_id.in_([r.id for r in rounds]), Delta.status.in_(ACCEPTED))
        )
    latencies = [(r.closed_at - r.created_at).total_seconds() for r in closed if r.closed_at]
    if not closed:
        return state, latencies, float("nan")
    span = (max(r.closed_at for r in closed if r.closed_at) - rounds[0].created_at).total_seconds()
    return state, latencies, (accepted or 0) / span if span > 0 else float("nan")


# -------------------------------------------------------------------------------------- run


def run_load_benchmark(
    workers: int = 100,
    rounds: int = 10,
    per_process: int = 25,
    workdir: Path | None = None,
    progress: Progress = lambda line: None,
) -> LoadBenchResult:
    """Run the load benchmark (see the module docstring)."""
    names = [f"w{i:03d}" for i in range(workers)]
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="fedmq-bench-load-") as tmp:
        base = workdir or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)  # the RabbitMQ node runs as its own user below it
        dep = BenchDeployment.start(base / "fedmq")  # its node opens files up to the hard limit
        with dep:
            dep.register(MODEL, make_linear_model(*MODEL_SHAPE, model_id=MODEL))
            progress(f"adding {workers} workers (one definitions import for their broker users)")
            started = time.perf_counter()
            with dep.database() as db:
                added = add_workers(dep.settings, db, names, dep.root / "workers", broker_dir=dep.broker_dir)
                dep.workers.update((a.name, a) for a in added)
                layout = base_layout(db)
            setup_s = time.perf_counter() - started
            dep.start_coordinator()
            simulators = Simulators(dep, names, per_process, layout)
            try:
                run_id = _run(dep, simulators, names, rounds, progress)
            finally:
                reports = simulators.stop()
            peak_mb = peak_memory_mb(dep.procs["coordinator"].pid)
            depths = queue_depths(dep.settings.amqp_url, names)
            confirmed = [t for r in reports for t in r["confirmed"]]
            with dep.database() as db:
                state, latencies, per_s = round_figures(db, run_id)
                audit = audit_rounds(db, [run_id], set(confirmed))
    received = Counter(t for r in reports for t in r["received"])
    dead_lettered = sum(n for q, n in depths.items() if q.endswith(".dlq"))
    # Quorum is every worker: a task that ended in no version is lost for this bench.
    lost = audit.lost + audit.unanswered + audit.pending + audit.dropped
    oracle_ok = audit.ok and lost == 0
    return LoadBenchResult(
        run_id=run_id,
        workers=workers,
        rounds=rounds,
        processes=len(range(0, workers, per_process)),
        setup_s=setup_s,
        run_state=state,
        tasks=audit.tasks,
        publishes_confirmed=len(confirmed),
        deltas_confirmed=len(set(confirmed)),
        deltas_accepted=audit.accepted,
        deltas_rejected=audit.rejected,
        deltas_per_s=per_s,
        round_latency_s=latencies,
        p50_round_s=statistics.median(latencies) if latencies else float("nan"),
        p99_round_s=float(np.percentile(latencies, 99)) if latencies else float("nan"),
        coordinator_peak_mb=peak_mb,
        dead_lettered=dead_lettered,
        messages_left=sum(depths.values()) - dead_lettered,
        queues_not_empty=depths,
        redelivered_tasks=sum(1 for n in received.values() if n > 1),
        lost=lost,
        duplicated=audit.duplicated,
        rounds_mismatched=audit.not_fedavg,
        bad_versions=audit.bad_versions,
        oracle_problems=list(audit.problems[:20]),
        oracle_ok=oracle_ok,
        target_met=oracle_ok and dead_lettered == 0 and state == "completed",
        worker_errors=[r["error"] for r in reports if r["error"]],
        load_average=os.getloadavg()[0],
    )


def _run(
    dep: BenchDeployment, simulators: Simulators, names: list[str], rounds: int, progress: Progress
) -> str:
    """Wait for every worker, submit the run and wait for its end; return its id.

    A run that does not finish in time is not an error here: the oracle counts what it left undone.
    """
    progress(f"{len(names)} simulated workers connecting ({len(simulators.procs)} processes)")
    dep.wait_workers_seen(names, timeout_s=180)
    run_id = new_id()
    progress(f"run {run_id}: {rounds} rounds with {len(names)} workers")
    submit(
        dep.settings,
        StartRun(
            run_id=run_id,
            model=MODEL,
            rounds=rounds,
            min_workers=len(names),
            deadline_s=3600.0,
            workers=names,
        ),
    )
    with dep.database() as db:

        def finished() -> bool:
            simulators.check()
            with db.session() as session:
                return session.scalar(select(Run.state).where(Run.run_id == run_id)) not in (None, "running")

        def relayed() -> bool:
            with db.session() as session:
                return not session.scalar(select(func.count()).where(OutboxMessage.sent_at.is_(None)))

        try:
            dep.wait_for(f"run {run_id}", finished, timeout_s=120 + 0.2 * len(names) * rounds)
            dep.wait_for("the outbox to be relayed", relayed, timeout_s=30)
        except TimeoutError as exc:
            progress(str(exc))
    return run_id
