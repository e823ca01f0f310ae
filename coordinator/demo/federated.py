"""The README's demo: federated learning on scikit-learn's digits with several worker processes.

Everything is real and local: a private RabbitMQ node (started here, stopped at the end), SQLite, a
coordinator process and one process per worker, each worker holding a non-IID share of the digits
(mostly two or three classes). The Keras model is registered from a Python file
(``coordinator/demo/digits_model.py``), trained for R FedAvg rounds with live progress, evaluated by
the coordinator on held-out digits after every round, and compared with the same model trained
centrally on the union of the workers' data for the same number of epochs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import devbroker
from common.keyfiles import write_key_pair
from common.messages import StartRun
from common.model.bundle import split_model
from common.settings import Settings
from coordinator.control import new_id, submit
from coordinator.db import Database, upgrade
from coordinator.registry import KeySigner, ModelRegistry
from coordinator.reports import RunView, run_view
from coordinator.workers import add_worker
from worker.threads import fair_share

logger = logging.getLogger(__name__)

DIGITS_MODEL_FILE = Path(__file__).with_name("digits_model.py")


@dataclass
class DemoResult:
    run: RunView
    centralized: list[float]
    federated: list[float]
    initial_accuracy: float
    worker_classes: dict[str, list[int]] = field(default_factory=dict)


def worker_classes(n_workers: int) -> list[list[int]]:
    """The two or three digits each worker mostly sees."""
    return [[(w * 2 + k) % 10 for k in range(3 if w % 2 else 2)] for w in range(n_workers)]


def split_digits(n_workers: int, seed: int = 0) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A disjoint non-IID split: a sample of digit d goes, with probability 0.85, to a worker whose
    classes include d (when one does), otherwise to any worker. 360 digits are held out for testing."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = rng.permutation(len(x))
    test_idx, train_idx = order[:360], order[360:]
    owners = {c: [w for w, cs in enumerate(worker_classes(n_workers)) if c in cs] for c in range(10)}
    assigned: list[list[int]] = [[] for _ in range(n_workers)]
    for i in train_idx:
        candidates = owners[int(y[i])]
        w = (
            int(rng.choice(candidates))
            if candidates and rng.random() < 0.85
            else int(rng.integers(n_workers))
        )
        assigned[w].append(int(i))
    parts = [{"x": x[idx], "y": y[idx]} for idx in (np.array(a) for a in assigned)]
    return parts, {"x": x[test_idx], "y": y[test_idx]}


def centralized_accuracy(
    parts: list[dict[str, np.ndarray]], test: dict[str, np.ndarray], epochs: list[int]
) -> list[float]:
    """The demo model trained on the union of the workers' data; test accuracy after each epoch count."""
    from coordinator.demo.digits_model import make_model

    model = make_model()
    x = np.concatenate([p["x"] for p in parts])
    y = np.concatenate([p["y"] for p in parts])
    out, done = [], 0
    for target in epochs:
        for _ in range(target - done):
            model.incremental_learn(x, y, 16, 1)
        done = target
        out.append(float((np.asarray(model(test["x"])).argmax(1) == test["y"]).mean()))
    return out


class Processes:
    """Child processes of the demo, all stopped (SIGTERM, then SIGKILL) when the block ends."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env, self.procs = root, env, dict[str, subprocess.Popen[bytes]]()

    def start(self, key: str, *args: str) -> None:
        log = open(self.root / f"{key}.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.procs[key] = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli.main", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def check(self) -> None:
        for key, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.root / f"{key}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{key} exited with code {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


@contextlib.contextmanager
def private_broker(directory: Path) -> Iterator[tuple[devbroker.DevNode, str]]:
    """A RabbitMQ node of our own (started unless one already runs there) and a fresh vhost on it."""
    node = devbroker.status(directory)
    started = node is None
    if node is None:
        node = devbroker.start(directory)
    vhost = f"fedmq-demo-{uuid.uuid4().hex[:8]}"
    devbroker.rabbitmqctl(node, "add_vhost", vhost)
    devbroker.rabbitmqctl(node, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield node, node.amqp_url.rsplit("/", 1)[0] + "/" + vhost
    finally:
        with contextlib.suppress(Exception):
            devbroker.rabbitmqctl(node, "delete_vhost", vhost)
        if started:
            devbroker.stop(directory)


def run_federated_demo(
    workdir: Path,
    workers: int = 6,
    rounds: int = 10,
    epochs: int = 2,
    progress: Callable[[RunView | None], None] = lambda view: None,
    broker_dir: Path | None = None,
) -> DemoResult:
    """Run the whole demo in ``workdir`` (wiped first) and return its figures."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    parts, test = split_digits(workers)
    np.savez(workdir / "heldout.npz", x=test["x"], y=test["y"])
    with private_broker(broker_dir or workdir / "rabbitmq") as (_node, amqp_url):
        settings = Settings(
            database_url=f"sqlite:///{workdir / 'fedmq.db'}", amqp_url=amqp_url, keys_dir=workdir / "keys"
        )
        write_key_pair(settings.keys_dir)
        db = Database.from_settings(settings)
        try:
            upgrade(db)
            from coordinator.demo.digits_model import make_model

            model = make_model()
            initial = float((np.asarray(model(test["x"])).argmax(1) == test["y"]).mean())
            code, weights = split_model(model)
            ModelRegistry(db, KeySigner.from_settings(settings)).register("digits", code, weights)
            classes = {}
            for i, (part, main) in enumerate(zip(parts, worker_classes(workers), strict=True)):
                name = f"worker-{i + 1}"
                (workdir / "data" / name).mkdir(parents=True)
                np.savez(workdir / "data" / name / "digits.npz", x=part["x"], y=part["y"])
                classes[name] = main
                add_worker(
                    settings,
                    db,
                    name,
                    workdir / "workers" / f"{name}.toml",
                    broker_dir=broker_dir or workdir / "rabbitmq",
                    data=str(workdir / "data" / name),
                )
        finally:
            db.dispose()
        env = dict(os.environ)
        env.update(
            FEDMQ_DATABASE_URL=settings.database_url,
            FEDMQ_AMQP_URL=settings.amqp_url,
            FEDMQ_KEYS_DIR=str(settings.keys_dir),
            TF_CPP_MIN_LOG_LEVEL="2",
            PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]),
        )
        procs = Processes(workdir, env)
        try:
            procs.start("coordinator", "coordinator", "run")
            for i in range(workers):
                procs.start(
                    f"worker-{i + 1}",
                    "worker",
                    "run",
                    "--config",
                    str(workdir / "workers" / f"worker-{i + 1}.toml"),
                    "--threads",
                    str(fair_share(workers)),
                )
            run_id = new_id()
            submit(
                settings,
                StartRun(
                    run_id=run_id,
                    model="digits",
                    rounds=rounds,
                    min_workers=workers,
                    deadline_s=600.0,
                    train={"epochs": epochs, "batch_size": 16},
                    eval_data=str(workdir / "heldout.npz"),
                ),
            )
            view = _follow(settings, run_id, procs, progress)
        finally:
            procs.stop()
    centralized = centralized_accuracy(parts, test, [epochs * (r + 1) for r in range(rounds)])
    federated = [float(r.metrics.get("eval_accuracy", float("nan"))) for r in view.rounds]
    return DemoResult(view, centralized, federated, initial, classes)


def _follow(
    settings: Settings, run_id: str, procs: Processes, progress: Callable[[RunView | None], None]
) -> RunView:
    db = Database.from_settings(settings)
    try:
        while True:
            procs.check()
            try:
                view: RunView | None = run_view(db, run_id)
            except Exception:
                view = None
            progress(view)
            if view is not None and view.state != "running":
                if view.state != "completed":
                    raise RuntimeError(f"run {run_id} {view.state}: {view.reason}")
                return view
            time.sleep(0.5)
    finally:
        db.dispose()
