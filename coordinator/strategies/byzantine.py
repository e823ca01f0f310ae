"""Byzantine-robust strategies: ``median``, ``trimmed-mean``, ``krum``, ``multi-krum``, ``bulyan``.

The rules live in :mod:`coordinator.strategies.robust`; here they get names and options. Each adds
its result to the base with ``server_lr`` (default 1.0), like FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from coordinator.strategies.base import Strategy
from coordinator.strategies.combiners import Combiner
from coordinator.strategies.options import as_float, as_int, as_optional_int
from coordinator.strategies.robust import Bulyan, Median, MultiKrum, TrimmedMean
from coordinator.strategies.server import PlainStep, ServerUpdate


class _Robust(Strategy):
    def _lr(self, server_lr: Any) -> float:
        return as_float(self.name, "server_lr", server_lr, low=0.0, low_open=True)

    def server_update(self) -> ServerUpdate:
        return PlainStep(self.options["server_lr"])


class MedianStrategy(_Robust):
    """Coordinate-wise median of the deltas."""

    name = "median"

    def __init__(self, *, server_lr: Any = 1.0) -> None:
        super().__init__(server_lr=self._lr(server_lr))

    def combiner(self, base: Sequence[np.ndarray]) -> Combiner:
        return Median(base)


class TrimmedMeanStrategy(_Robust):
    """Coordinate-wise mean without the ``floor(beta * n)`` largest and smallest values (beta 0.1)."""

    name = "trimmed-mean"

    def __init__(self, *, beta: Any = 0.1, server_lr: Any = 1.0) -> None:
        super().__init__(
            beta=as_float(self.name, "beta", beta, low=0.0, high=0.5, high_open=True),
            server_lr=self._lr(server_lr),
        )

    def combiner(self, base: Sequence[np.ndarray]) -> Combiner:
        return TrimmedMean(base, self.options["beta"])


class KrumStrategy(_Robust):
    """The one delta with the lowest Krum score; ``f`` (default 1) is the Byzantine count tolerated."""

    name = "krum"

    def __init__(self, *, f: Any = 1, server_lr: Any = 1.0) -> None:
        super().__init__(f=as_int(self.name, "f", f), server_lr=self._lr(server_lr))

    def combiner(self, base: Sequence[np.ndarray]) -> Combiner:
        return MultiKrum(base, self.options["f"], 1)


class MultiKrumStrategy(_Robust):
    """Mean of the ``m`` lowest-scoring deltas (``m`` default: n - f); ``f`` default 1."""

    name = "multi-krum"

    def __init__(self, *, f: Any = 1, m: Any = None, server_lr: Any = 1.0) -> None:
        super().__init__(
            f=as_int(self.name, "f", f),
            m=as_optional_int(self.name, "m", m, low=1),
            server_lr=self._lr(server_lr),
        )

    def combiner(self, base: Sequence[np.ndarray]) -> Combiner:
        return MultiKrum(base, self.options["f"], self.options["m"])


class BulyanStrategy(_Robust):
    """Krum selection of n - 2f deltas, then a coordinate-wise trimmed mean around the median."""

    name = "bulyan"

    def __init__(self, *, f: Any = 1, server_lr: Any = 1.0) -> None:
        super().__init__(f=as_int(self.name, "f", f), server_lr=self._lr(server_lr))

    def combiner(self, base: Sequence[np.ndarray]) -> Combiner:
        return Bulyan(base, self.options["f"])
