"""A fedmq deployment for end-to-end tests: real RabbitMQ, a real database, real processes.

The coordinator and the workers run as separate ``python -m coordinator.cli.main`` processes (so
tests can SIGKILL them); set-up steps (schema, keys, registering a model, adding workers) call the
library in-process, which is what the CLI commands do. Each deployment's processes keep their
temporary files (the coordinator's chunk reassembly) in its own directory.

:meth:`Cluster.check_oracle` is the end of every fault test: :func:`coordinator.audit.audit_rounds`
over the whole database, told which deltas the workers saw confirmed (their logs name each task).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common import devbroker
from common.keyfiles import write_key_pair
from common.messages import StartRun
from common.model import DynamicDLModel
from common.model.bundle import split_model
from common.settings import Settings
from coordinator.audit import Audit, audit_rounds
from coordinator.control import new_id, submit
from coordinator.db import Database, upgrade
from coordinator.registry import KeySigner, ModelRegistry
from coordinator.reports import RunView, run_view
from coordinator.workers import add_worker

ROOT = Path(__file__).resolve().parents[2]
# worker/daemon.py logs this once the broker confirmed a delta's publish, before the task's ack.
CONFIRMED = re.compile(r"task ([0-9a-f]{32}): delta against \S+ v\d+ sent")


@dataclasses.dataclass
class Cluster:
    root: Path
    settings: Settings
    broker_dir: Path
    vhost: str
    procs: dict[str, subprocess.Popen[bytes]] = dataclasses.field(default_factory=dict)

    @classmethod
    def create(
        cls, root: Path, database_url: str, amqp_url: str, broker_dir: Path, chunk_size: int = 4 << 20
    ) -> Cluster:
        """A deployment in its own RabbitMQ virtual host, so no queue or user state leaks between tests."""
        node = devbroker.status(broker_dir)
        assert node is not None, f"no RabbitMQ node in {broker_dir}"
        vhost = f"fedmq-test-{uuid.uuid4().hex[:10]}"
        devbroker.rabbitmqctl(node, "add_vhost", vhost)
        devbroker.rabbitmqctl(node, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        amqp_url = amqp_url.rsplit("/", 1)[0] + "/" + vhost
        settings = Settings(
            database_url=database_url, amqp_url=amqp_url, keys_dir=root / "keys", chunk_size=chunk_size
        )
        write_key_pair(settings.keys_dir)
        cluster = cls(root, settings, broker_dir, vhost)
        with cluster.database() as db:
            upgrade(db)
        return cluster

    # -- in-process set-up ---------------------------------------------------------------------
    def database(self) -> _DbContext:
        return _DbContext(self.settings)

    def register(self, name: str, model: DynamicDLModel) -> None:
        code, weights = split_model(model)
        with self.database() as db:
            ModelRegistry(db, KeySigner.from_settings(self.settings)).register(name, code, weights)

    def add_worker(self, name: str, data: dict[str, np.ndarray]) -> Path:
        data_dir = self.root / "data" / name
        data_dir.mkdir(parents=True, exist_ok=True)
        np.savez(data_dir / "part-0.npz", **data)
        config = self.root / "workers" / f"{name}.toml"
        with self.database() as db:
            add_worker(self.settings, db, name, config, broker_dir=self.broker_dir, data=str(data_dir))
        return config

    def start_run(self, model: str, **kwargs: object) -> str:
        run_id = new_id()
        fields = {"rounds": 1, "min_workers": 1, "deadline_s": 120.0, **kwargs}
        submit(self.settings, StartRun(run_id=run_id, model=model, **fields))  # type: ignore[arg-type]
        return run_id

    # -- processes -------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            FEDMQ_DATABASE_URL=self.settings.database_url,
            FEDMQ_AMQP_URL=self.settings.amqp_url,
            FEDMQ_KEYS_DIR=str(self.settings.keys_dir),
            FEDMQ_CHUNK_SIZE=str(self.settings.chunk_size),
            FEDMQ_AMQP_HEARTBEAT_S=str(self.settings.amqp_heartbeat_s),
            TF_CPP_MIN_LOG_LEVEL="2",
            PYTHONPATH=str(ROOT),
            TMPDIR=str(self.tmp_dir),
        )
        return env

    @property
    def tmp_dir(self) -> Path:
        """The processes' temporary directory: the coordinator reassembles chunked deltas under it."""
        path = self.root / "tmp"
        path.mkdir(exist_ok=True)
        return path

    def _spawn(
        self, key: str, *args: str, module: str = "coordinator.cli.main", kill_at: str | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{key}.log", "ab")  # noqa: SIM115 - kept open for the process' life
        env = self.env()
        if kill_at:
            env["FEDMQ_FAULT_KILL_AT"] = kill_at  # common/faults.py: SIGKILL at that point
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs[key] = proc
        return proc

    def start_coordinator(self, kill_at: str | None = None) -> subprocess.Popen[bytes]:
        return self._spawn("coordinator", "coordinator", "run", kill_at=kill_at)

    def start_worker(
        self, name: str, malicious: bool = False, kill_at: str | None = None
    ) -> subprocess.Popen[bytes]:
        """A worker daemon; ``malicious`` runs tests/integration/malicious_worker.py (poisoned deltas)."""
        module = "tests.integration.malicious_worker" if malicious else "coordinator.cli.main"
        config = str(self.root / "workers" / f"{name}.toml")
        return self._spawn(name, "worker", "run", "--config", config, module=module, kill_at=kill_at)

    def kill(self, key: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(key)
        proc.send_signal(sig)
        proc.wait(timeout=60)

    def log(self, key: str) -> str:
        path = self.root / f"{key}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        """Stop every process, then delete the virtual host with its queues."""
        self._stop_processes()
        node = devbroker.status(self.broker_dir)
        if node is not None:
            devbroker.rabbitmqctl(node, "delete_vhost", self.vhost)

    def _stop_processes(self) -> None:
        for key in list(self.procs):
            proc = self.procs.pop(key)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    # -- observing -------------------------------------------------------------------------------
    def confirmed_deltas(self) -> set[str]:
        """Task ids whose delta a worker saw confirmed by the broker (from every worker's log)."""
        logs = [p for p in self.root.glob("*.log") if p.stem != "coordinator"]
        return {m for p in logs for m in CONFIRMED.findall(p.read_text(errors="replace"))}

    def check_oracle(self) -> Audit:
        """Every fault test's end: nothing lost, nothing counted twice, every version whole."""
        with self.database() as db:
            audit = audit_rounds(db, confirmed=self.confirmed_deltas())
        assert audit.ok, "\n".join(audit.problems)
        return audit

    def run(self, run_id: str) -> RunView | None:
        with self.database() as db:
            try:
                return run_view(db, run_id)
            except Exception:
                return None

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            for key, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(
                        f"{key} exited with {proc.returncode} while waiting for {what}:\n{self.log(key)[-4000:]}"
                    )
            time.sleep(0.25)
        logs = "\n".join(f"--- {k}\n{self.log(k)[-3000:]}" for k in ("coordinator", *self.procs))
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    def wait_exit(self, key: str, timeout_s: float = 120.0) -> int:
        """Wait for a process expected to die (at a fault point); return its exit code. One that
        does not die in time is killed (not left running after the test) and the wait fails."""
        proc = self.procs.pop(key)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise

    def wait_workers_seen(self, names: list[str], timeout_s: float = 120.0) -> None:
        """Wait until every named worker's heartbeat reached the coordinator (so it counts as live)."""
        from sqlalchemy import select

        from coordinator.db.models import Worker

        def seen() -> bool:
            with self.database() as db, db.session() as s:
                rows = s.scalars(select(Worker.name).where(Worker.last_seen_at.is_not(None)))
                return set(names) <= set(rows)

        self.wait_for(f"heartbeats of {', '.join(names)}", seen, timeout_s)

    def wait_run(self, run_id: str, timeout_s: float = 180.0) -> RunView:
        self.wait_for(
            f"run {run_id} to end",
            lambda: (v := self.run(run_id)) is not None and v.state != "running",
            timeout_s,
        )
        view = self.run(run_id)
        assert view is not None
        return view


class _DbContext:
    def __init__(self, settings: Settings) -> None:
        self.db = Database.from_settings(settings)

    def __enter__(self) -> Database:
        return self.db

    def __exit__(self, *exc: object) -> None:
        self.db.dispose()
