"""Server updates: how the aggregated delta moves the base version (plain step, momentum, adaptive).

The aggregated delta Δ is a pseudo-gradient pointing from the base towards the clients' models.

- :class:`PlainStep`: ``x + lr * Δ`` (FedAvg, FedProx and the robust strategies).
- :class:`Momentum`: ``m = momentum * m + Δ``; ``x + lr * m`` (FedAvgM, Hsu et al. 2019).
- :class:`Adaptive`: Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2, without
  bias correction: ``m = b1 * m + (1 - b1) * Δ``; then
  Adagrad ``v = v + Δ²``, Adam ``v = b2 * v + (1 - b2) * Δ²``, Yogi
  ``v = v - (1 - b2) * Δ² * sign(v - Δ²)``; ``x + eta * m / (sqrt(v) + tau)``, with ``m`` starting
  at 0 and ``v`` at ``tau²``.

State is a list of arrays so the engine can store it as a weight frame: for each state vector (m,
then v), one array per base array, in the base array's shape and dtype (float32 at least); a
non-averaged (integer) base array has an empty float32 placeholder. The momentum and adaptive
arithmetic is float64 (the aggregated delta is converted one array at a time); the plain step works
in the aggregated delta's own dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

from common.errors import ConfigError
from coordinator.strategies.combiners import CACHE_BLOCK_BYTES, Combined, is_averaged

AdaptiveKind = Literal["adagrad", "adam", "yogi"]


class ServerUpdate(ABC):
    """Applies an aggregated delta to the base; optimizers keep ``vectors`` state vectors per array."""

    vectors = 0

    @abstractmethod
    def apply(
        self,
        base: Sequence[np.ndarray],
        delta: Combined,
        state: list[np.ndarray] | None,
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """The new weights (base dtypes) and the new state; ``delta``'s arrays may be overwritten."""

    def initial_state(self, base: Sequence[np.ndarray]) -> list[np.ndarray] | None:
        """The state before the first round (None for stateless updates)."""
        return None

    def check_state(
        self, base: Sequence[np.ndarray], state: Sequence[np.ndarray] | None
    ) -> list[np.ndarray] | None:
        """``state`` if it fits ``base`` (the initial state when None); ConfigError if it does not."""
        if self.vectors == 0 or state is None:
            return self.initial_state(base)
        expected = [_state_template(b) for b in base] * self.vectors
        if len(state) != len(expected):
            raise ConfigError(
                f"server state has {len(state)} arrays, expected {len(expected)} for this model and strategy"
            )
        for i, (have, want) in enumerate(zip(state, expected, strict=True)):
            if have.shape != want.shape or have.dtype != want.dtype:
                raise ConfigError(
                    f"server state array {i}: {have.dtype} {have.shape}, expected {want.dtype} {want.shape}"
                )
        return list(state)


class PlainStep(ServerUpdate):
    def __init__(self, lr: float) -> None:
        self.lr = lr

    def apply(
        self,
        base: Sequence[np.ndarray],
        delta: Combined,
        state: list[np.ndarray] | None,
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        factor = self.lr * delta.scale
        out = []
        for b, d in zip(base, delta.arrays, strict=True):
            if d is None:
                out.append(np.array(b, copy=True))
                continue
            # sums in the model's dtype become the new weights: no allocation, no copy
            new = d if d.dtype == b.dtype and d.shape == b.shape else np.empty(b.shape, dtype=b.dtype)
            flat_d, flat_b, flat_new = d.reshape(-1), np.ravel(b), new.reshape(-1)
            step = CACHE_BLOCK_BYTES // d.itemsize
            for start in range(0, flat_d.size, step):  # one pass, blocks in the cache
                part = flat_d[start : start + step]
                if factor != 1.0:
                    part *= factor
                part += flat_b[start : start + step]
                if new is not d:
                    flat_new[start : start + step] = part
            out.append(new)
        return out, state


class Momentum(ServerUpdate):
    vectors = 1

    def __init__(self, lr: float, momentum: float) -> None:
        self.lr, self.momentum = lr, momentum

    def initial_state(self, base: Sequence[np.ndarray]) -> list[np.ndarray] | None:
        return [np.zeros_like(_state_template(b)) for b in base]

    def apply(
        self,
        base: Sequence[np.ndarray],
        delta: Combined,
        state: list[np.ndarray] | None,
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        assert state is not None
        out, new_state = [], []
        for b, d, m in zip(base, _scaled(delta), state, strict=True):
            if d is None:
                out.append(np.array(b, copy=True))
                new_state.append(m)
                continue
            d += self.momentum * m.astype(np.float64)  # d becomes the new momentum
            new_state.append(d.astype(m.dtype))
            d *= self.lr
            d += b
            out.append(d.astype(b.dtype, copy=False))
        return out, new_state


class Adaptive(ServerUpdate):
    vectors = 2

    def __init__(self, kind: AdaptiveKind, eta: float, beta1: float, beta2: float, tau: float) -> None:
        self.kind, self.eta, self.beta1, self.beta2, self.tau = kind, eta, beta1, beta2, tau

    def initial_state(self, base: Sequence[np.ndarray]) -> list[np.ndarray] | None:
        moments = [np.zeros_like(_state_template(b)) for b in base]
        variances = [np.full_like(_state_template(b), self.tau**2) for b in base]
        return moments + variances

    def apply(
        self,
        base: Sequence[np.ndarray],
        delta: Combined,
        state: list[np.ndarray] | None,
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        assert state is not None
        k = len(base)
        out, moments, variances = [], list(state[:k]), list(state[k:])
        for i, (b, d) in enumerate(zip(base, _scaled(delta), strict=True)):
            if d is None:
                out.append(np.array(b, copy=True))
                continue
            m = self.beta1 * moments[i].astype(np.float64) + (1 - self.beta1) * d
            v = self._second_moment(variances[i].astype(np.float64), np.square(d, out=d))
            moments[i], variances[i] = m.astype(moments[i].dtype), v.astype(variances[i].dtype)
            np.sqrt(v, out=v)
            v += self.tau
            m /= v
            m *= self.eta
            m += b
            out.append(m.astype(b.dtype, copy=False))
        return out, moments + variances

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        """The new v from the previous ``v`` and ``Δ²`` (both float64; both may be overwritten)."""
        if self.kind == "adagrad":
            v += squared
        elif self.kind == "adam":
            v *= self.beta2
            squared *= 1 - self.beta2
            v += squared
        else:  # yogi
            sign = np.sign(v - squared)
            squared *= (1 - self.beta2) * sign
            v -= squared
        return v


def _scaled(delta: Combined) -> Iterator[np.ndarray | None]:
    """The aggregated delta's arrays in float64 with its scale applied, one at a time.

    A float64 array is scaled in place; any other (float32 sums) is converted into a new float64
    array, so the conversion holds one array's temporary at a time, not a second model.
    """
    for d in delta.arrays:
        if d is None or d.dtype != np.float64:
            yield None if d is None else np.multiply(d, delta.scale, dtype=np.float64)
            continue
        if delta.scale != 1.0:
            d *= delta.scale
        yield d


def _state_template(base: np.ndarray) -> np.ndarray:
    """An empty array of the shape and dtype one state vector has for ``base``."""
    if not is_averaged(base):
        return np.empty(0, dtype=np.float32)
    return np.empty(base.shape, dtype=np.result_type(base.dtype, np.float32))
