"""The aggregation every strategy runs: clip, combine, add noise, apply the server update.

::

    add(delta, n):   scale = min(1, clip / ||delta||)        (clip option; 1 otherwise)
                     combiner.add(delta, n or 1 under DP, scale)
    finish():        Δ = combiner.result()                   (None: no delta, the base is kept)
                     Δ += N(0, (z * clip / count)^2)          (dp_noise option)
                     new, state = update.apply(base, Δ, state)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from coordinator.strategies.base import Aggregation
from coordinator.strategies.combiners import Combiner
from coordinator.strategies.options import PrivacyOptions
from coordinator.strategies.privacy import add_gaussian_noise, clip_scale, noise_generator
from coordinator.strategies.server import ServerUpdate

logger = logging.getLogger(__name__)


class PipelineAggregation(Aggregation):
    def __init__(
        self,
        base: Sequence[np.ndarray],
        combiner: Combiner,
        update: ServerUpdate,
        state: list[np.ndarray] | None,
        privacy: PrivacyOptions,
    ) -> None:
        self._base = list(base)
        self._combiner = combiner
        self._update = update
        self._state = state
        self._privacy = privacy
        self._count = 0
        self._finished = False

    @property
    def count(self) -> int:
        return self._count

    @property
    def streaming(self) -> bool:
        return not self._combiner.holds_deltas

    def add(self, delta: Sequence[np.ndarray], sample_count: float, staleness: int = 0) -> None:
        if self._finished:
            raise RuntimeError("add() after finish()")
        if sample_count <= 0:
            return
        weight = 1.0 if self._privacy.noise_multiplier > 0 else float(sample_count)
        self._combiner.add(delta, weight, clip_scale(delta, self._privacy.clip))
        self._count += 1

    def finish(self) -> list[np.ndarray]:
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        delta = self._combiner.result()
        if delta is None:
            return [np.array(b, copy=True) for b in self._base]
        if self._privacy.noise_multiplier > 0:
            assert self._privacy.clip is not None
            std = self._privacy.noise_multiplier * self._privacy.clip / self._count
            logger.info("DP noise: std %.3g on the mean of %d clipped deltas", std, self._count)
            # the combined arrays are scaled by delta.scale afterwards: noise them by std / scale
            add_gaussian_noise(
                delta.arrays, std / delta.scale, noise_generator(self._privacy.seed, self._base)
            )
        new, self._state = self._update.apply(self._base, delta, self._state)
        return new

    def server_state(self) -> list[np.ndarray] | None:
        return self._state
