"""Adaptive server optimizers of Reddi et al. (2021): ``fedadam``, ``fedyogi``, ``fedadagrad``.

The deltas are averaged as in FedAvg (sample-weighted, streaming); the mean Δ is the pseudo-gradient
of a server Adam / Yogi / Adagrad step (formulas in :mod:`coordinator.strategies.server`). Options:
``eta`` (server learning rate), ``beta1``, ``beta2`` (Adagrad has no beta2), ``tau`` (adaptivity;
also the square root of v's starting value) and ``accumulate`` (the mean's sums, as in FedAvg). The
moments are the server state carried between rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from coordinator.strategies.base import Strategy
from coordinator.strategies.combiners import ACCUMULATE_CHOICES, Combiner, WeightedMean
from coordinator.strategies.options import as_choice, as_float
from coordinator.strategies.server import Adaptive, AdaptiveKind, ServerUpdate


class _AdaptiveStrategy(Strategy):
    kind: ClassVar[AdaptiveKind]

    def _set(self, eta: Any, beta1: Any, beta2: Any, tau: Any, accumulate: Any) -> None:
        self.options = {
            "eta": as_float(self.name, "eta", eta, low=0.0, low_open=True),
            "beta1": as_float(self.name, "beta1", beta1, low=0.0, high=1.0, high_open=True),
            "beta2": as_float(self.name, "beta2", beta2, low=0.0, high=1.0, high_open=True),
            "tau": as_float(self.name, "tau", tau, low=0.0, low_open=True),
            "accumulate": as_choice(self.name, "accumulate", accumulate, ACCUMULATE_CHOICES),
        }

    def combiner(self, base: Sequence[np.ndarray]) -> Combiner:
        return WeightedMean(base, self.options["accumulate"])

    def server_update(self) -> ServerUpdate:
        o = self.options
        return Adaptive(self.kind, o["eta"], o["beta1"], o.get("beta2", 0.0), o["tau"])


class FedAdam(_AdaptiveStrategy):
    name = "fedadam"
    kind = "adam"

    def __init__(
        self,
        *,
        eta: Any = 0.01,
        beta1: Any = 0.9,
        beta2: Any = 0.99,
        tau: Any = 1e-3,
        accumulate: Any = ACCUMULATE_CHOICES[0],
    ) -> None:
        super().__init__()
        self._set(eta, beta1, beta2, tau, accumulate)


class FedYogi(_AdaptiveStrategy):
    name = "fedyogi"
    kind = "yogi"

    def __init__(
        self,
        *,
        eta: Any = 0.01,
        beta1: Any = 0.9,
        beta2: Any = 0.99,
        tau: Any = 1e-3,
        accumulate: Any = ACCUMULATE_CHOICES[0],
    ) -> None:
        super().__init__()
        self._set(eta, beta1, beta2, tau, accumulate)


class FedAdagrad(_AdaptiveStrategy):
    name = "fedadagrad"
    kind = "adagrad"

    def __init__(
        self, *, eta: Any = 0.01, beta1: Any = 0.0, tau: Any = 1e-3, accumulate: Any = ACCUMULATE_CHOICES[0]
    ) -> None:
        super().__init__()
        self._set(eta, beta1, 0.0, tau, accumulate)
        del self.options["beta2"]
