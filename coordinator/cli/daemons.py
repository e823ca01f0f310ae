"""``fedmq coordinator run`` and ``fedmq worker run``: the two daemons."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import typer

from common.broker import RabbitmqBroker, broker_config_from_settings
from common.memory import keep_freed_memory
from common.settings import load_settings

coordinator_app = typer.Typer(help="The coordinator daemon.", no_args_is_help=True)
worker_app = typer.Typer(help="The worker daemon.", no_args_is_help=True)


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: the daemon finishes what it is doing and exits."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        logging.getLogger("fedmq").warning("signal %d: finishing the current work, then stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _log_info() -> None:
    """Daemons log fedmq's INFO messages (pika's own INFO chatter stays off)."""
    root = logging.getLogger()
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
        logging.getLogger("pika").setLevel(logging.WARNING)


@coordinator_app.command("run")
def coordinator_run(
    database_url: str = typer.Option(None, "--database-url", help="Overrides FEDMQ_DATABASE_URL."),
    amqp_url: str = typer.Option(None, "--amqp-url", help="Overrides FEDMQ_AMQP_URL."),
) -> None:
    """Run the coordinator until SIGTERM: rounds, deltas, releases, fetches.

    Example: FEDMQ_AMQP_URL=amqp://guest:guest@localhost:5672/%2F fedmq coordinator run
    """
    keep_freed_memory()  # before any thread starts: see common/memory.py
    from coordinator.db import Database, require_current
    from coordinator.registry import KeySigner, ModelRegistry
    from coordinator.service import Coordinator

    _log_info()
    settings = load_settings(database_url=database_url, amqp_url=amqp_url)
    db = Database.from_settings(settings)
    require_current(db)
    registry = ModelRegistry(db, KeySigner.from_settings(settings))
    broker = RabbitmqBroker(broker_config_from_settings(settings), name="fedmq-coordinator")
    stop = _stop_on_signals()
    Coordinator(db, registry, broker).run(stop)


@worker_app.command("run")
def worker_run(
    config: Path = typer.Option(
        ..., "--config", "-c", help="The worker config file from `fedmq workers add`."
    ),
    data: Path = typer.Option(
        None, "--data", help="Directory of .npz files with x and y (overrides the config)."
    ),
    threads: int = typer.Option(
        None,
        "--threads",
        min=1,
        help="CPU threads the model code may use (BLAS, OpenMP, TensorFlow); overrides the "
        "config's `threads`. Default: every core. Give each of N workers sharing a machine "
        "about cores/N.",
    ),
) -> None:
    """Run a worker until SIGTERM: train on local data for every task, answer apply jobs.

    Example: fedmq worker run --config .fedmq/workers/alice.toml --data data/alice
    """
    keep_freed_memory()  # before any thread starts: see common/memory.py
    from worker.config import load_worker_config
    from worker.daemon import WorkerDaemon
    from worker.data import load_local_data

    _log_info()
    cfg = load_worker_config(config)
    if threads is not None or cfg.threads is not None:
        from worker.threads import limit_threads

        limit_threads(threads if threads is not None else cfg.threads)
    data_path = data or (Path(cfg.data) if cfg.data else None)
    local = load_local_data(data_path) if data_path is not None else None
    broker = RabbitmqBroker(cfg.broker_config(), name=f"fedmq-worker-{cfg.name}")
    stop = _stop_on_signals()
    WorkerDaemon(cfg, broker, local).run(stop)
