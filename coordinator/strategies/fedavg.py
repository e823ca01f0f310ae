"""Mean-based strategies: FedAvg, FedAvgM (server momentum) and FedProx (client proximal term).

- ``fedavg`` (McMahan et al., 2017): ``new = base + server_lr * sum_i(n_i * delta_i) / sum_i(n_i)``,
  streamed into running sums: memory is one model whatever the number of deltas. Option
  ``accumulate``: ``float32`` (default, the model's precision) or ``float64`` sums
  (:func:`~coordinator.strategies.combiners.accumulator_dtype` says what each costs).
- ``fedavgm`` (Hsu et al., 2019): the same mean Δ (same ``accumulate`` option), then ``m = momentum * m + Δ``,
  ``new = base + server_lr * m``; ``m`` is the server state carried between rounds.
- ``fedprox`` (Li et al., 2020): aggregated like FedAvg; the workers train with the proximal term
  ``mu/2 * ||w - base||^2`` (``client_options()`` gives them ``proximal_mu``; see worker/trainer.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from coordinator.strategies.base import Strategy
from coordinator.strategies.combiners import ACCUMULATE_CHOICES, Combiner, WeightedMean
from coordinator.strategies.options import as_choice, as_float
from coordinator.strategies.server import Momentum, PlainStep, ServerUpdate


class FedAvg(Strategy):
    """Sample-weighted averaging; ``server_lr`` (1.0) scales the mean, ``accumulate`` (float32)."""

    name = "fedavg"

    def __init__(self, *, server_lr: Any = 1.0, accumulate: Any = ACCUMULATE_CHOICES[0]) -> None:
        super().__init__(
            server_lr=as_float(self.name, "server_lr", server_lr, low=0.0, low_open=True),
            accumulate=as_choice(self.name, "accumulate", accumulate, ACCUMULATE_CHOICES),
        )

    def combiner(self, base: Sequence[np.ndarray]) -> Combiner:
        return WeightedMean(base, self.options["accumulate"])

    def server_update(self) -> ServerUpdate:
        return PlainStep(self.options["server_lr"])


class FedAvgM(Strategy):
    """FedAvg with server momentum; ``server_lr`` (1.0), ``momentum`` (0.9), ``accumulate`` (float32)."""

    name = "fedavgm"

    def __init__(
        self, *, server_lr: Any = 1.0, momentum: Any = 0.9, accumulate: Any = ACCUMULATE_CHOICES[0]
    ) -> None:
        super().__init__(
            server_lr=as_float(self.name, "server_lr", server_lr, low=0.0, low_open=True),
            momentum=as_float(self.name, "momentum", momentum, low=0.0, high=1.0, high_open=True),
            accumulate=as_choice(self.name, "accumulate", accumulate, ACCUMULATE_CHOICES),
        )

    def combiner(self, base: Sequence[np.ndarray]) -> Combiner:
        return WeightedMean(base, self.options["accumulate"])

    def server_update(self) -> ServerUpdate:
        return Momentum(self.options["server_lr"], self.options["momentum"])


class FedProx(FedAvg):
    """FedAvg on the server; option ``mu`` (0.01) is the workers' proximal coefficient."""

    name = "fedprox"

    def __init__(
        self, *, mu: Any = 0.01, server_lr: Any = 1.0, accumulate: Any = ACCUMULATE_CHOICES[0]
    ) -> None:
        super().__init__(server_lr=server_lr, accumulate=accumulate)
        self.options["mu"] = as_float(self.name, "mu", mu, low=0.0)

    def client_options(self) -> dict[str, Any]:
        return {"proximal_mu": self.options["mu"]}
