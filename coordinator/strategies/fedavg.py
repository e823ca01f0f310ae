"""FedAvg: the sample-weighted mean of the deltas, added to the base (McMahan et al., 2017).

``new = base + server_lr * sum_i(n_i * delta_i) / sum_i(n_i)``, accumulated in float64 in one running
sum per array, so memory is one model's worth (plus the base) whatever the number of deltas.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.errors import ConfigError
from coordinator.strategies.base import Aggregation, Strategy, is_averaged


class FedAvgAggregation(Aggregation):
    def __init__(self, base: Sequence[np.ndarray], server_lr: float) -> None:
        self._base = list(base)
        self._sums: list[np.ndarray | None] = [
            np.zeros(b.shape, dtype=np.float64) if is_averaged(b) else None for b in self._base
        ]
        self._weight = 0.0
        self._count = 0
        self._server_lr = server_lr

    @property
    def count(self) -> int:
        return self._count

    def add(self, delta: Sequence[np.ndarray], sample_count: int, staleness: int = 0) -> None:
        weight = float(max(sample_count, 0))
        if weight == 0:
            return
        for total, d in zip(self._sums, delta, strict=True):
            if total is not None:
                total += np.multiply(d, weight, dtype=np.float64)  # one temporary of one array's size
        self._weight += weight
        self._count += 1

    def finish(self) -> list[np.ndarray]:
        if self._weight == 0:
            return [np.array(b, copy=True) for b in self._base]
        scale = self._server_lr / self._weight
        out = []
        for base, total in zip(self._base, self._sums, strict=True):
            if total is None:
                out.append(np.array(base, copy=True))
            else:
                total *= scale
                total += base
                out.append(total.astype(base.dtype, copy=False))
        return out


class FedAvg(Strategy):
    """Sample-weighted averaging; option ``server_lr`` (default 1.0) scales the averaged delta."""

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        if not float(server_lr) > 0:
            raise ConfigError("fedavg: server_lr must be positive")
        super().__init__(server_lr=float(server_lr))

    def begin(self, base: Sequence[np.ndarray]) -> Aggregation:
        return FedAvgAggregation(base, self.options["server_lr"])
