"""A throw-away fedmq deployment for benchmarks: private RabbitMQ node, SQLite, coordinator, workers.

Everything lives under one directory and everything started here is stopped by :meth:`close` (also
on errors and Ctrl-C, when used as a context manager): the worker and coordinator processes, then
the RabbitMQ node. Set-up steps (schema, keys, model, workers) call the library in-process, as the
CLI commands do; the coordinator and the workers run as ``python -m coordinator.cli.main`` processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import numpy as np
from sqlalchemy import func, select

from common import devbroker
from common.keyfiles import write_key_pair
from common.model import DynamicDLModel
from common.model.bundle import split_model
from common.settings import Settings
from coordinator.db import Database, upgrade
from coordinator.db.models import Worker
from coordinator.registry import KeySigner, ModelRegistry
from coordinator.workers import AddedWorker, add_worker

logger = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parents[2]


class BenchDeployment:
    """See the module docstring; build with :meth:`start`, use as a context manager."""

    def __init__(self, root: Path, node: devbroker.DevNode, settings: Settings) -> None:
        self.root = root
        self.node = node
        self.settings = settings
        self.broker_dir = Path(node.directory)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.workers: dict[str, AddedWorker] = {}

    @classmethod
    def start(cls, root: Path, chunk_size: int = 4 << 20) -> BenchDeployment:
        """Start a private RabbitMQ node in ``root/broker``; schema and keys in ``root``."""
        root = root.resolve()
        if root.exists() and any(root.iterdir()):
            raise FileExistsError(f"{root} is not empty: a benchmark deployment needs a fresh directory")
        root.mkdir(parents=True, exist_ok=True)
        logger.info("starting a private RabbitMQ node in %s", root / "broker")
        node = devbroker.start(root / "broker")
        try:
            settings = Settings(
                database_url=f"sqlite:///{root / 'fedmq.db'}",
                amqp_url=node.amqp_url,
                keys_dir=root / "keys",
                chunk_size=chunk_size,
            )
            write_key_pair(settings.keys_dir)
            deployment = cls(root, node, settings)
            with deployment.database() as db:
                upgrade(db)
        except BaseException:
            devbroker.stop(root / "broker")
            raise
        return deployment

    def __enter__(self) -> BenchDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ set-up

    @contextlib.contextmanager
    def database(self) -> Iterator[Database]:
        db = Database.from_settings(self.settings)
        try:
            yield db
        finally:
            db.dispose()

    def register(self, name: str, model: DynamicDLModel) -> None:
        code, weights = split_model(model)
        with self.database() as db:
            ModelRegistry(db, KeySigner.from_settings(self.settings)).register(name, code, weights)

    def add_worker(self, name: str, data: tuple[np.ndarray, np.ndarray] | None = None) -> AddedWorker:
        """A worker with its broker user, queues and config; ``data`` (x, y) saved as its ``.npz``."""
        data_dir = None
        if data is not None:
            data_dir = self.root / "data" / name
            data_dir.mkdir(parents=True, exist_ok=True)
            np.savez(data_dir / "part-0.npz", x=data[0], y=data[1])
        config = self.root / "workers" / f"{name}.toml"
        with self.database() as db:
            added = add_worker(
                self.settings,
                db,
                name,
                config,
                broker_dir=self.broker_dir,
                data=str(data_dir) if data_dir else None,
            )
        self.workers[name] = added
        return added

    # ----------------------------------------------------------------------- processes

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            FEDMQ_DATABASE_URL=self.settings.database_url,
            FEDMQ_AMQP_URL=self.settings.amqp_url,
            FEDMQ_KEYS_DIR=str(self.settings.keys_dir),
            FEDMQ_CHUNK_SIZE=str(self.settings.chunk_size),
            PYTHONPATH=os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p),
        )
        return env

    def spawn(self, key: str, *args: str) -> subprocess.Popen[bytes]:
        with open(self.root / f"{key}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "coordinator.cli.main", *args],
                cwd=self.root,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[key] = proc
        return proc

    def start_coordinator(self) -> None:
        self.spawn("coordinator", "coordinator", "run")

    def start_worker(self, name: str, threads: int | None = None) -> None:
        extra = ("--threads", str(threads)) if threads is not None else ()
        self.spawn(name, "worker", "run", "--config", str(self.workers[name].config_path), *extra)

    def log_tail(self, key: str, chars: int = 3000) -> str:
        path = self.root / f"{key}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def check_processes(self) -> None:
        """Raise with the log's tail when a process this deployment started has exited."""
        for key, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{key} exited with {proc.returncode}:\n{self.log_tail(key)}")

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            self.check_processes()
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.1)

    def wait_workers_seen(self, names: list[str], timeout_s: float = 120.0) -> None:
        """Wait until the coordinator recorded a heartbeat of every worker in ``names``."""

        def seen() -> bool:
            with self.database() as db, db.session() as session:
                count = session.scalar(
                    select(func.count()).where(Worker.name.in_(names), Worker.last_seen_at.is_not(None))
                )
            return count == len(names)

        self.wait_for(f"{len(names)} workers to report", seen, timeout_s)

    def stop_processes(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for key, proc in list(self.procs.items()):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop on SIGTERM; killing it", key)
                proc.kill()
                proc.wait()
        self.procs.clear()

    def close(self) -> None:
        """Stop every process, then the RabbitMQ node (its directory stays, for the logs)."""
        try:
            self.stop_processes()
        finally:
            devbroker.stop(self.broker_dir)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while a benchmark runs, so its clean-up runs too."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
