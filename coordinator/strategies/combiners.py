"""Combiners turn a round's deltas into one aggregated delta; :class:`WeightedMean` streams.

A combiner sees each delta once through :meth:`Combiner.add` with a weight (the sample count, or 1)
and a scale (the clipping factor, applied lazily so that no delta is copied). :meth:`Combiner.result`
returns one float64 array per averaged (floating-point) base array and None for the others, or None
altogether when nothing was added.

:class:`WeightedMean` keeps one float64 running sum per array, so its memory is one model in float64
whatever the number of deltas; it adds each delta in cache-sized blocks through a reused scratch
buffer, so the float32 to float64 conversion never allocates a temporary of a whole array.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

SCRATCH_COORDS = 1 << 16
"""Coordinates per block of the streaming mean: 512 KiB of float64, which stays in the L2 cache."""


def is_averaged(array: np.ndarray) -> bool:
    """Whether a weight array takes part in aggregation (floating point) or keeps its base value."""
    return bool(np.issubdtype(array.dtype, np.floating))


def l2_norm(delta: Sequence[np.ndarray]) -> float:
    """L2 norm over every floating-point array of ``delta``, summed in float64 block by block."""
    squares = 0.0
    for array in delta:
        if not is_averaged(array):
            continue
        flat = np.ravel(array)
        for start in range(0, flat.size, SCRATCH_COORDS):
            block = flat[start : start + SCRATCH_COORDS].astype(np.float64, copy=False)
            squares += float(np.dot(block, block))
    return float(np.sqrt(squares))


class Combiner(ABC):
    """Combines deltas into one aggregated delta (float64 arrays; None for non-averaged arrays)."""

    def __init__(self, base: Sequence[np.ndarray]) -> None:
        self.averaged = [is_averaged(b) for b in base]
        self.shapes = [b.shape for b in base]

    @abstractmethod
    def add(self, delta: Sequence[np.ndarray], weight: float, scale: float = 1.0) -> None:
        """Take ``scale * delta`` into account with ``weight``; the arrays are never written."""

    @abstractmethod
    def result(self) -> list[np.ndarray | None] | None:
        """The aggregated delta, or None when no delta (with positive weight) was added."""


class WeightedMean(Combiner):
    """``sum_i(w_i * s_i * delta_i) / sum_i(w_i)``, streamed into float64 running sums."""

    def __init__(self, base: Sequence[np.ndarray]) -> None:
        super().__init__(base)
        self._sums: list[np.ndarray | None] = [
            np.empty(shape, dtype=np.float64) if avg else None
            for avg, shape in zip(self.averaged, self.shapes, strict=True)
        ]
        self._scratch = np.empty(SCRATCH_COORDS, dtype=np.float64)
        self._weight = 0.0

    def add(self, delta: Sequence[np.ndarray], weight: float, scale: float = 1.0) -> None:
        if weight <= 0:
            return
        factor = weight * scale
        first = self._weight == 0
        for total, array in zip(self._sums, delta, strict=True):
            if total is None:
                continue
            flat_total, flat = total.reshape(-1), np.ravel(array)
            if first:  # the sums start as the first delta: no zeros to read
                np.multiply(flat, factor, out=flat_total, dtype=np.float64)
            else:
                _add_scaled(flat_total, flat, factor, self._scratch)
        self._weight += weight

    def result(self) -> list[np.ndarray | None] | None:
        if self._weight == 0:
            return None
        inverse = 1.0 / self._weight
        for total in self._sums:
            if total is not None:
                total *= inverse
        return list(self._sums)


def _add_scaled(total: np.ndarray, flat: np.ndarray, factor: float, scratch: np.ndarray) -> None:
    """``total += factor * flat`` in float64, block by block through ``scratch`` (no temporaries)."""
    for start in range(0, flat.size, scratch.size):
        stop = min(start + scratch.size, flat.size)
        work = scratch[: stop - start]
        np.multiply(flat[start:stop], factor, out=work, dtype=np.float64)
        part = total[start:stop]
        np.add(part, work, out=part)
