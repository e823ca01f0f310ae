"""The digits study: accuracy per round of FedAvg, FedProx, FedAdam and asynchronous FedBuff.

Same non-IID split as the demo (each worker mostly two or three digits), same Keras model, the
workers' real training code (``worker.trainer.train``) and the coordinator's real strategies, run in
one process without a broker: the broker moves bytes and does not change the numbers, and this keeps
the study to a minute or two. Asynchronous FedBuff is simulated with an event clock: each worker's
training time is proportional to its data size times a speed factor (one worker five times slower),
a version is made every K deltas with the coordinator's staleness weights, and a worker always trains
the newest version there was when it started.

``fedmq bench study`` prints the table and writes a PNG plot (matplotlib) when asked.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class StudyResult:
    rounds: int
    workers: int
    curves: dict[str, list[float]] = field(default_factory=dict)
    centralized: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "workers": self.workers,
            "curves": self.curves,
            "centralized": self.centralized,
        }

    def markdown(self) -> str:
        names = list(self.curves)
        lines = ["| round | " + " | ".join(names) + " | centralized |", "|---" * (len(names) + 2) + "|"]
        for r in range(self.rounds):
            cells = [f"{self.curves[n][r]:.3f}" for n in names]
            lines.append(f"| {r + 1} | " + " | ".join(cells) + f" | {self.centralized[r]:.3f} |")
        return "\n".join(lines)


def _accuracy(code: Any, weights: list[np.ndarray], test: dict[str, np.ndarray]) -> float:
    from common.model.bundle import join_model

    model = join_model(code, [np.array(w) for w in weights])
    return float((np.asarray(model(test["x"])).argmax(1) == test["y"]).mean())


def _sync_curve(
    code: Any,
    initial: list[np.ndarray],
    parts: list[Any],
    test: dict[str, np.ndarray],
    strategy_name: str,
    options: dict[str, Any],
    rounds: int,
    train: dict[str, Any],
) -> list[float]:
    from common.model.bundle import join_model
    from coordinator.strategies import get_strategy
    from worker.trainer import train as train_locally

    strategy = get_strategy(strategy_name, options)
    weights, state, curve = initial, None, []
    for _ in range(rounds):
        aggregation = strategy.begin(weights, state)
        for part in parts:
            result = train_locally(
                join_model(code, [np.array(w) for w in weights]), part, {**train, **strategy.client_options()}
            )
            aggregation.add(result.delta, result.sample_count)
        weights, state = aggregation.finish(), aggregation.server_state()
        curve.append(_accuracy(code, weights, test))
    return curve


def _async_curve(
    code: Any,
    initial: list[np.ndarray],
    parts: list[Any],
    test: dict[str, np.ndarray],
    rounds: int,
    buffer: int,
    train: dict[str, Any],
    slow_factor: float = 5.0,
) -> list[float]:
    from common.model.bundle import join_model
    from coordinator.rounds import staleness_weight
    from coordinator.strategies import get_strategy
    from worker.trainer import train as train_locally

    versions = [initial]
    speed = [slow_factor if i == 0 else 1.0 for i in range(len(parts))]
    events = [(len(p) * speed[i], i, 0) for i, p in enumerate(parts)]  # (finish time, worker, base version)
    heapq.heapify(events)
    aggregation = get_strategy("fedavg").begin(versions[-1])
    curve: list[float] = []
    while len(curve) < rounds:
        now, worker, base = heapq.heappop(events)
        result = train_locally(join_model(code, [np.array(w) for w in versions[base]]), parts[worker], train)
        staleness = len(versions) - 1 - base
        aggregation.add(result.delta, result.sample_count * staleness_weight(staleness), staleness=staleness)
        if aggregation.count >= buffer:
            versions.append(aggregation.finish())
            curve.append(_accuracy(code, versions[-1], test))
            aggregation = get_strategy("fedavg").begin(versions[-1])
        heapq.heappush(events, (now + len(parts[worker]) * speed[worker], worker, len(versions) - 1))
    return curve


def run_study(
    workers: int = 6, rounds: int = 10, epochs: int = 2, progress: Callable[[str], None] = lambda name: None
) -> StudyResult:
    """Run the four configurations and the centralized baseline."""
    from common.model.bundle import split_model
    from coordinator.demo.digits_model import make_model
    from coordinator.demo.federated import centralized_accuracy, split_digits
    from worker.data import LocalData

    raw_parts, test = split_digits(workers)
    parts = [LocalData(p["x"], p["y"], ("split",)) for p in raw_parts]
    code, initial = split_model(make_model())
    train = {"epochs": epochs, "batch_size": 16}
    result = StudyResult(rounds, workers)
    configs: list[tuple[str, str, dict[str, Any]]] = [
        ("FedAvg", "fedavg", {}),
        ("FedProx (mu=0.1)", "fedprox", {"mu": 0.1}),
        ("FedAdam (eta=0.03)", "fedadam", {"eta": 0.03}),
    ]
    for label, name, options in configs:
        progress(label)
        result.curves[label] = _sync_curve(code, initial, parts, test, name, options, rounds, train)
    progress("FedBuff (async, K=3)")
    result.curves["FedBuff (async, K=3)"] = _async_curve(code, initial, parts, test, rounds, 3, train)
    progress("centralized")
    result.centralized = centralized_accuracy(raw_parts, test, [epochs * (r + 1) for r in range(rounds)])
    return result


def plot(result: StudyResult, path: Path) -> None:
    """Write the curves as a PNG (needs matplotlib: pip install matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    x = list(range(1, result.rounds + 1))
    for label, curve in result.curves.items():
        ax.plot(x, curve, marker="o", label=label)
    ax.plot(x, result.centralized, linestyle="--", color="black", label="centralized (same epochs)")
    ax.set_xlabel("round (async: version)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"Non-IID digits, {result.workers} workers")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
