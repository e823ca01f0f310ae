"""Benchmark of aggregation: FedAvg against numpy's in-place add, its memory as N grows, robust costs.

Three measurements, each against a baseline taken in the same run on the same machine:

- *throughput*: FedAvg (default options: float32 sums) of N deltas of a ~``size_mb`` MB model
  (realistic layer shapes, float32) from ``begin`` to ``finish``, counted in bytes of deltas
  consumed per second, against ``a += b`` on two float32 arrays of the model's total size (bytes of
  ``b`` per second). The deltas come from a pool of a few distinct ones (the model is larger than
  the caches, so reuse does not help) with distinct sample counts (100, 101, ...), so every delta
  after the first is scaled (equal counts without clipping take a plain add, which is faster).
  FedAvg with ``accumulate=float64`` and the implementation before the blocked sums (one float64
  temporary per array) are measured too, for the first N.
- *memory*: the deltas are produced one at a time the way the round engine streams them (a fresh
  ``bytes`` as read from SQL, decoded into read-only views); the peak of memory traced by
  ``tracemalloc`` and, on Linux, the peak resident set growth (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``) for each N. Target: the peaks for N = 10 and N = 50 within one model size.
- *cost*: every other strategy's time on a smaller model (``robust_size_mb``, ``robust_n`` deltas)
  divided by FedAvg's on the same deltas.

Figures are the best of ``repeat`` runs. The benchmark never fails on a missed target.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import re
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from common.codec import decode_weights, encode_weights, weights_nbytes
from coordinator.bench.codec import best_seconds as _best
from coordinator.bench.codec import make_weights
from coordinator.strategies import get_strategy

logger = logging.getLogger(__name__)

THROUGHPUT_TARGET = 0.5
_MB = 1_000_000
_POOL = 3
COST_STRATEGIES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("fedavgm", {}),
    ("fedadam", {}),
    ("fedavg", {"clip": 10.0, "dp_noise": 0.1, "dp_seed": 0}),
    ("median", {}),
    ("trimmed-mean", {"beta": 0.2}),
    ("krum", {"f": 2}),
    ("multi-krum", {"f": 2}),
    ("bulyan", {"f": 1}),
)


@dataclass(frozen=True)
class FedAvgFigure:
    """FedAvg of ``n`` deltas: best time, delta bytes consumed per second, ratio to ``a += b``.

    The baseline is ``n`` passes of ``a += b`` over the model's size, timed alternately with FedAvg
    so that both see the same machine (a loaded machine penalises long runs more than short ones).
    """

    n: int
    seconds: float
    gbps: float
    add_gbps: float
    ratio_to_add: float
    target_met: bool


@dataclass(frozen=True)
class MemoryFigure:
    """Peak memory (MB) while FedAvg consumes ``n`` streamed deltas; RSS None where unmeasurable."""

    n: int
    traced_peak_mb: float
    rss_peak_growth_mb: float | None


@dataclass(frozen=True)
class CostFigure:
    """A strategy's time on the cost model, and its ratio to FedAvg's time on the same deltas."""

    strategy: str
    options: dict[str, Any]
    seconds: float
    ratio_to_fedavg: float


@dataclass(frozen=True)
class AggregateBenchResult:
    """Figures of one run; bandwidths in GB/s (10**9 bytes/s)."""

    size_mb: float
    arrays: int
    repeat: int
    fedavg: list[FedAvgFigure]
    float64_fedavg_gbps: float
    float64_ratio_to_add: float
    previous_fedavg_gbps: float
    memory: list[MemoryFigure]
    traced_peak_spread_mb: float
    memory_target_met: bool
    cost_size_mb: float
    cost_n: int
    fedavg_cost_seconds: float
    costs: list[CostFigure]
    throughput_target: float

    def as_dict(self) -> dict[str, Any]:
        """The figures as plain JSON-able values."""
        return dataclasses.asdict(self)


def run_aggregate_benchmark(
    size_mb: float = 100,
    n_values: Sequence[int] = (10, 50),
    repeat: int = 3,
    cost_size_mb: float | None = None,
    cost_n: int = 10,
) -> AggregateBenchResult:
    """Measure FedAvg throughput and memory for each N in ``n_values``, and the strategies' costs.

    The costs are measured on a model of ``cost_size_mb`` (default: 20 MB, or ``size_mb`` if smaller).
    """
    cost_size_mb = min(20.0, size_mb) if cost_size_mb is None else cost_size_mb
    if size_mb <= 0 or cost_size_mb <= 0 or repeat < 1 or not n_values or min(n_values) < 1 or cost_n < 1:
        raise ValueError("sizes must be positive, repeat and every N at least 1")
    base = make_weights(size_mb, seed=0)
    nbytes = weights_nbytes(base)
    logger.info("aggregate benchmark: %d arrays, %d bytes per model", len(base), nbytes)
    fedavg, float64_gbps, previous_gbps = _throughput(base, size_mb, n_values, repeat)

    frame = encode_weights(base)
    memory = [_memory(base, frame, n) for n in n_values]
    del frame
    peaks = [m.traced_peak_mb for m in memory]
    spread = max(peaks) - min(peaks)

    fedavg_cost, costs = _costs(cost_size_mb, cost_n, repeat)
    return AggregateBenchResult(
        size_mb=nbytes / _MB,
        arrays=len(base),
        repeat=repeat,
        fedavg=fedavg,
        float64_fedavg_gbps=float64_gbps,
        float64_ratio_to_add=float64_gbps / fedavg[0].add_gbps,
        previous_fedavg_gbps=previous_gbps,
        memory=memory,
        traced_peak_spread_mb=spread,
        memory_target_met=spread <= nbytes / _MB,
        cost_size_mb=weights_nbytes(make_weights(cost_size_mb)) / _MB,
        cost_n=cost_n,
        fedavg_cost_seconds=fedavg_cost,
        costs=costs,
        throughput_target=THROUGHPUT_TARGET,
    )


def _throughput(
    base: list[np.ndarray], size_mb: float, n_values: Sequence[int], repeat: int
) -> tuple[list[FedAvgFigure], float, float]:
    """FedAvg figures for each N; float64 FedAvg's and the previous implementation's bandwidth."""
    nbytes = weights_nbytes(base)
    pool = [make_weights(size_mb, seed=1 + i) for i in range(_POOL)]
    rng = np.random.default_rng(2)
    a = rng.standard_normal(nbytes // 4, dtype=np.float32)
    b = rng.standard_normal(nbytes // 4, dtype=np.float32)

    def deltas(n: int) -> Iterator[list[np.ndarray]]:
        return (pool[i % _POOL] for i in range(n))

    def adds(n: int) -> None:
        for _ in range(n):
            np.add(a, b, out=a)

    figures = []
    for n in n_values:
        add_s = fedavg_s = float("inf")
        for _ in range(repeat):
            add_s = min(add_s, _best(partial(adds, n), 1))
            fedavg_s = min(fedavg_s, _best(partial(lambda k: _fedavg(base, deltas(k)), n), 1))
        gbps, add_gbps = n * nbytes / fedavg_s / 1e9, n * nbytes / add_s / 1e9
        ratio = gbps / add_gbps
        figures.append(FedAvgFigure(n, fedavg_s, gbps, add_gbps, ratio, ratio >= THROUGHPUT_TARGET))
    first = n_values[0]
    float64 = _best(lambda: _aggregate("fedavg", {"accumulate": "float64"}, base, deltas(first)), repeat)
    previous = _best(lambda: _previous_fedavg(base, deltas(first)), repeat)
    return figures, first * nbytes / float64 / 1e9, first * nbytes / previous / 1e9


def _fedavg(base: list[np.ndarray], deltas: Iterator[list[np.ndarray]]) -> list[np.ndarray]:
    return _aggregate("fedavg", {}, base, deltas)


def _aggregate(
    name: str, options: dict[str, Any], base: list[np.ndarray], deltas: Iterator[list[np.ndarray]]
) -> list[np.ndarray]:
    agg = get_strategy(name, options).begin(base)
    for i, delta in enumerate(deltas):
        agg.add(delta, _sample_count(i))
    return agg.finish()


def _sample_count(i: int) -> int:
    """The sample count the benchmark gives the i-th delta: all distinct, as workers' data sets are."""
    return 100 + i


def _previous_fedavg(base: list[np.ndarray], deltas: Iterator[list[np.ndarray]]) -> list[np.ndarray]:
    """The implementation before the blocked sums: ``total += np.multiply(d, w, dtype=float64)``."""
    sums = [np.zeros(b.shape, np.float64) if np.issubdtype(b.dtype, np.floating) else None for b in base]
    weight = 0.0
    for i, delta in enumerate(deltas):
        count = float(_sample_count(i))
        for total, d in zip(sums, delta, strict=True):
            if total is not None:
                total += np.multiply(d, count, dtype=np.float64)
        weight += count
    return [b if s is None else (s / weight + b).astype(b.dtype) for b, s in zip(base, sums, strict=True)]


def _memory(base: list[np.ndarray], frame: bytes, n: int) -> MemoryFigure:
    """Peaks while FedAvg consumes ``n`` deltas decoded one at a time from fresh copies of ``frame``."""

    def streamed() -> Iterator[list[np.ndarray]]:
        for _ in range(n):
            yield decode_weights(
                bytes(memoryview(frame))
            )  # a fresh copy: what the engine does with each blob read from SQL

    gc.collect()
    rss_start = _reset_rss_peak()
    tracemalloc.start()
    try:
        result = _fedavg(base, streamed())
        traced_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    rss_peak = _rss_kb("VmHWM")
    del result
    growth = None if rss_start is None or rss_peak is None else (rss_peak - rss_start) * 1024 / _MB
    return MemoryFigure(n, traced_peak / _MB, growth)


def _costs(size_mb: float, n: int, repeat: int) -> tuple[float, list[CostFigure]]:
    base = make_weights(size_mb, seed=10)
    deltas = [make_weights(size_mb, seed=11 + i) for i in range(n)]
    for delta in deltas:
        for d in delta:
            if np.issubdtype(d.dtype, np.floating):
                d *= 0.01
    fedavg = _best(lambda: _fedavg(base, iter(deltas)), repeat)
    costs = []
    for name, options in COST_STRATEGIES:
        seconds = _best(partial(lambda s, o: _aggregate(s, o, base, iter(deltas)), name, options), repeat)
        costs.append(CostFigure(name, dict(options), seconds, seconds / fedavg))
    return fedavg, costs


def _reset_rss_peak() -> int | None:
    """Reset the kernel's peak-RSS counter (Linux ``clear_refs`` 5); the current RSS in kB, or None."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _rss_kb("VmRSS")


def _rss_kb(field: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else None
