"""`fedmq bench round`: median FedAvg round time of fedmq and of Flower, measured in the same run.

Both sides train the same softmax regression (``n_in x n_out`` float32 weights plus a bias) from
the same initial weights, on the same synthetic local data (a few samples per worker), with the
same trivial training (one SGD epoch over those samples), aggregated by FedAvg, for the same
number of rounds and workers, on this machine over loopback:

Each worker's numeric code (BLAS, OpenMP) may use the machine's cores divided by the number of
workers, at least one thread, on both sides (``threads_per_worker``; worker/threads.py says why).

- fedmq: a private RabbitMQ node, SQLite, the coordinator and one process per worker. A round's
  time is its row's ``created_at`` (tasks written) to ``closed_at`` (aggregated, next version
  stored), from SQL.
- Flower (PyPI ``flwr`` 1.42, in its own venv ``.venv-flwr``, created on first use): its
  deployment runtime, a SuperLink and one SuperNode per worker, the app in
  ``coordinator/bench/flower_app`` started with ``flwr run``. A round's time is from the start of
  FedAvg's ``configure_train`` to the end of its ``aggregate_train``, recorded by the ServerApp.

Targets (issue 4): tiny model, 10 workers: fedmq <= 0.1x Flower's median round time; ~100 MB
model, 4 workers: <= 0.25x. The benchmark reports; it never fails on a missed target.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select

from common.messages import StartRun
from common.model.numpy_model import make_linear_model
from common.ports import free_port
from coordinator.bench.deploy import BenchDeployment, sigterm_as_interrupt
from coordinator.control import new_id, submit
from coordinator.db.models import Round, Run
from worker.threads import fair_share

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
FLOWER_APP = Path(__file__).resolve().parent / "flower_app"
FLOWER_VENV = ROOT / ".venv-flwr"
FLOWER_REQUIREMENT = "flwr>=1.42,<1.43"
BENCH_PACKAGES = ("numpy", "scipy")  # what the Flower app's training imports, as fedmq's does
TINY_TARGET = 0.1
LARGE_TARGET = 0.25
TINY_SHAPE = (32, 10)
LARGE_OUTPUTS = 1000
LEARNING_RATE = 0.1

Progress = Callable[[str], None]


@dataclass(frozen=True)
class RoundBenchResult:
    """Figures of one run; times in seconds. ``ratio`` is fedmq's median over Flower's."""

    workers: int
    rounds: int
    model_mb: float
    n_in: int
    n_out: int
    samples: int
    # CPU threads each worker's numeric code may use on both sides (the machine's cores shared out)
    threads_per_worker: int
    fedmq_round_s: list[float]
    fedmq_median_s: float
    flower_runtime: str  # "deployment" (SuperLink + SuperNodes), or "none" (skipped / failed)
    flower_round_s: list[float] = field(default_factory=list)
    flower_median_s: float | None = None
    ratio: float | None = None
    target: float = TINY_TARGET
    target_met: bool | None = None
    note: str = ""
    load_average: float = 0.0  # 1-minute load average at the end: other work on the machine skews figures


def model_shape(model_mb: float) -> tuple[int, int]:
    """(n_in, n_out) of the benchmark model: tiny for 0, else about ``model_mb`` MB of float32."""
    if model_mb <= 0:
        return TINY_SHAPE
    return max(1, round(model_mb * 1e6 / 4 / LARGE_OUTPUTS)), LARGE_OUTPUTS


def local_data(node: int, samples: int, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Worker ``node``'s synthetic data; the same function as ``flower_app``'s ``task.local_data``."""
    rng = np.random.default_rng(1000 + node)
    return rng.normal(0.0, 1.0, size=(samples, n_in)).astype("float32"), rng.integers(0, n_out, samples)


# ------------------------------------------------------------------------------------ fedmq


def run_fedmq(
    root: Path,
    workers: int,
    rounds: int,
    n_in: int,
    n_out: int,
    samples: int,
    progress: Progress,
    threads: int = 1,
) -> list[float]:
    """Round times of a fedmq run (see the module docstring)."""
    with BenchDeployment.start(root) as dep:
        dep.register("bench", make_linear_model(n_in, n_out, model_id="bench", learning_rate=LEARNING_RATE))
        names = [f"w{i}" for i in range(workers)]
        progress(f"fedmq: adding {workers} workers (broker users, queues, configs)")
        for i, name in enumerate(names):
            dep.add_worker(name, local_data(i, samples, n_in, n_out))
        dep.start_coordinator()
        for name in names:
            dep.start_worker(name, threads=threads)
        dep.wait_workers_seen(names)
        run_id = new_id()
        progress(f"fedmq: {rounds} rounds with {workers} workers")
        submit(
            dep.settings,
            StartRun(
                run_id=run_id,
                model="bench",
                rounds=rounds,
                min_workers=workers,
                deadline_s=600.0,
                workers=names,
                train={"epochs": 1, "batch_size": 32},
            ),
        )
        with dep.database() as db:

            def finished() -> bool:
                with db.session() as session:
                    state = session.scalar(select(Run.state).where(Run.run_id == run_id))
                return state is not None and state != "running"

            dep.wait_for(f"run {run_id}", finished, timeout_s=120.0 + 60.0 * rounds)
            with db.session() as session:
                state = session.scalar(select(Run.state).where(Run.run_id == run_id))
                rows = list(
                    session.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.number))
                )
                times = [
                    (r.closed_at - r.created_at).total_seconds()
                    for r in rows
                    if r.state == "closed" and r.closed_at is not None
                ]
        if state != "completed" or len(times) != rounds:
            raise RuntimeError(f"fedmq run {run_id} ended {state} with {len(times)} of {rounds} rounds")
        return times


# ----------------------------------------------------------------------------------- Flower


def ensure_flower_venv(progress: Progress) -> Path:
    """The bench venv with ``flwr`` (created on first use); returns its ``bin`` directory."""
    bin_dir = FLOWER_VENV / "bin"
    if (bin_dir / "flwr").exists() and (bin_dir / "flower-superlink").exists():
        if not list(FLOWER_VENV.glob("lib/python*/site-packages/scipy")):
            # a venv made before the apps' training used scipy's BLAS: both sides must run the same
            progress(f"Flower: installing scipy into {FLOWER_VENV}")
            subprocess.run(
                [str(bin_dir / "python"), "-m", "pip", "install", "-q", *BENCH_PACKAGES], check=True
            )
        return bin_dir
    progress(f"Flower: creating {FLOWER_VENV} and installing {FLOWER_REQUIREMENT} (about a minute)")
    subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True)
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q"]
    if subprocess.run([*pip, FLOWER_REQUIREMENT, *BENCH_PACKAGES]).returncode != 0:
        # flwr 1.42.0 pins a certifi newer than some package mirrors hold: install its declared
        # dependencies with that one pin relaxed, then flwr itself without dependency resolution.
        progress("Flower: retrying with flwr's certifi pin relaxed")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [
                    str(bin_dir / "python"),
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "-d",
                    tmp,
                    FLOWER_REQUIREMENT,
                ],
                check=True,
            )
            (wheel,) = Path(tmp).glob("flwr-*.whl")
            requires = _wheel_requirements(wheel)
            subprocess.run([*pip, *requires, *BENCH_PACKAGES], check=True)
            subprocess.run([*pip, "--no-deps", str(wheel)], check=True)
    return bin_dir


def _wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(name).decode().splitlines()
    requires = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    requires = [r for r in requires if "extra ==" not in r]
    return ["certifi" if r.startswith("certifi") else r for r in requires]


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Flower process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s:.0f} s")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Flower detaches its SuperExec processes into new sessions)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop_tree(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the processes and everything they started, then SIGKILL what is left."""
    pids = [p.pid for p in procs] + [d for p in procs for d in _descendants(p.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
        if not any(_alive(pid) for pid in pids):
            return


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def run_flower(
    root: Path,
    workers: int,
    rounds: int,
    n_in: int,
    n_out: int,
    samples: int,
    progress: Progress,
    threads: int = 1,
) -> list[float]:
    """Round times of the same FedAvg run on Flower's deployment runtime."""
    bin_dir = ensure_flower_venv(progress)
    root.mkdir(parents=True, exist_ok=True)
    home, app, timing = root / "flwr-home", root / "app", root / "timing.jsonl"
    shutil.copytree(FLOWER_APP, app, dirs_exist_ok=True)
    link_port = free_port()
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{link_port}"\n'
        "insecure = true\n"
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    # The same thread cap as fedmq's workers, for every Flower process (ClientApps inherit it).
    env.update(
        {name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    )
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, *args: str) -> subprocess.Popen[bytes]:
        with open(root / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [str(bin_dir / args[0]), *args[1:]], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        procs.append(proc)
        return proc

    try:
        progress(f"Flower: SuperLink and {workers} SuperNodes on loopback")
        link = spawn(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--port",
            str(link_port),
        )
        _wait_port(link_port, link)
        for i in range(workers):
            spawn(
                f"supernode-{i}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--port",
                str(free_port()),
                "--node-config",
                f"partition-id={i}",
            )
        progress(f"Flower: {rounds} rounds with {workers} SuperNodes (flwr run)")
        config = (
            f"num-rounds={rounds} num-nodes={workers} n-in={n_in} n-out={n_out} samples={samples} "
            f'learning-rate={LEARNING_RATE} timing-file="{timing}"'
        )
        run = spawn("flwr-run", "flwr", "run", str(app), "bench", "--stream", "--run-config", config)
        deadline = time.monotonic() + 120.0 + 120.0 * rounds
        while _rounds_recorded(timing) < rounds:
            if run.poll() is not None and _rounds_recorded(timing) < rounds:
                raise RuntimeError(
                    f"flwr run exited with {run.returncode} after {_rounds_recorded(timing)} rounds; "
                    f"see {root / 'flwr-run.log'}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"Flower did not finish {rounds} rounds; see {root}")
            time.sleep(0.2)
        rows = [json.loads(line) for line in timing.read_text().splitlines() if line.strip()]
        return [float(r["end"]) - float(r["start"]) for r in sorted(rows, key=lambda r: r["round"])]
    finally:
        _stop_tree(procs)


def _rounds_recorded(timing: Path) -> int:
    return len(timing.read_text().splitlines()) if timing.exists() else 0


# ---------------------------------------------------------------------------------- the run


def run_round_benchmark(
    workers: int = 10,
    rounds: int = 5,
    model_mb: float = 0.0,
    samples: int = 16,
    flower: bool = True,
    workdir: Path | None = None,
    progress: Progress = lambda line: None,
) -> RoundBenchResult:
    """Run fedmq, then (unless ``flower`` is False) Flower, and compare median round times."""
    n_in, n_out = model_shape(model_mb)
    target = TINY_TARGET if model_mb <= 0 else LARGE_TARGET
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="fedmq-bench-round-") as tmp:
        base = workdir or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)  # the RabbitMQ node runs as its own user below it
        progress(f"model {n_in}x{n_out} float32 ({(n_in * n_out + n_out) * 4 / 1e6:.2f} MB)")
        threads = fair_share(workers)
        progress(f"each worker's numeric code on {threads} CPU thread(s), on both sides")
        fedmq_times = run_fedmq(base / "fedmq", workers, rounds, n_in, n_out, samples, progress, threads)
        fedmq_median = statistics.median(fedmq_times)
        progress(f"fedmq: median round {fedmq_median * 1000:.1f} ms")
        flower_times: list[float] = []
        note = "Flower skipped (--no-flower)"
        if flower:
            try:
                flower_times = run_flower(
                    base / "flower", workers, rounds, n_in, n_out, samples, progress, threads
                )
                note = ""
            except (RuntimeError, TimeoutError, OSError, subprocess.CalledProcessError) as exc:
                logger.warning("Flower run failed: %s", exc)
                note = f"Flower's deployment runtime failed: {exc}"
    flower_median = statistics.median(flower_times) if flower_times else None
    ratio = fedmq_median / flower_median if flower_median else None
    if flower_median is not None:
        progress(f"Flower: median round {flower_median * 1000:.1f} ms")
    return RoundBenchResult(
        workers=workers,
        rounds=rounds,
        model_mb=model_mb,
        n_in=n_in,
        n_out=n_out,
        samples=samples,
        threads_per_worker=threads,
        fedmq_round_s=fedmq_times,
        fedmq_median_s=fedmq_median,
        flower_runtime="deployment" if flower_times else "none",
        flower_round_s=flower_times,
        flower_median_s=flower_median,
        ratio=ratio,
        target=target,
        target_met=None if ratio is None else ratio <= target,
        note=note,
        load_average=os.getloadavg()[0],
    )
