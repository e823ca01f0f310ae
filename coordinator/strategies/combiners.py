"""Combiners turn a round's deltas into one aggregated delta; :class:`WeightedMean` streams.

A combiner sees each delta once through :meth:`Combiner.add` with a weight (the sample count, or 1)
and a scale (the clipping factor, applied lazily so that no delta is copied). :meth:`Combiner.result`
returns a :class:`Combined`: one float64 array per averaged (floating-point) base array and None for
the others, times a scale; or None altogether when nothing was added.

:class:`WeightedMean` keeps one float64 running sum per array, so its memory is one model in float64
whatever the number of deltas; it adds each delta in cache-sized blocks through a reused scratch
buffer, so the float32 to float64 conversion never allocates a temporary of a whole array.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCRATCH_COORDS = 1 << 15
"""Coordinates per block of the streaming mean: 256 KiB of float64, so a block of the sums, of the
scratch and of the delta stay in a 1 MiB L2 cache together."""


def is_averaged(array: np.ndarray) -> bool:
    """Whether a weight array takes part in aggregation (floating point) or keeps its base value."""
    return bool(np.issubdtype(array.dtype, np.floating))


def l2_norm(delta: Sequence[np.ndarray]) -> float:
    """L2 norm over every floating-point array of ``delta``, summed in float64 block by block.

    ``einsum`` rather than ``np.dot``: a BLAS call per small block costs more than the block's work.
    """
    squares = 0.0
    scratch = np.empty(SCRATCH_COORDS, dtype=np.float64)
    for array in delta:
        if not is_averaged(array):
            continue
        flat = np.ravel(array)
        for start in range(0, flat.size, scratch.size):
            work = scratch[: min(scratch.size, flat.size - start)]
            np.copyto(work, flat[start : start + scratch.size])
            squares += float(np.einsum("i,i->", work, work))
    return float(np.sqrt(squares))


@dataclass
class Combined:
    """An aggregated delta: ``scale * arrays[j]`` for each averaged array j (None for the others).

    The arrays are float64 and belong to the receiver, which may overwrite them.
    """

    arrays: list[np.ndarray | None]
    scale: float = 1.0


class Combiner(ABC):
    """Combines deltas into one aggregated delta (float64 arrays; None for non-averaged arrays)."""

    def __init__(self, base: Sequence[np.ndarray]) -> None:
        self.averaged = [is_averaged(b) for b in base]
        self.shapes = [b.shape for b in base]

    @abstractmethod
    def add(self, delta: Sequence[np.ndarray], weight: float, scale: float = 1.0) -> None:
        """Take ``scale * delta`` into account with ``weight``; the arrays are never written."""

    @abstractmethod
    def result(self) -> Combined | None:
        """The aggregated delta, or None when no delta (with positive weight) was added."""


class WeightedMean(Combiner):
    """``sum_i(w_i * s_i * delta_i) / sum_i(w_i)``, streamed into float64 running sums.

    Memory: the float64 sums (two float32 models' worth), whatever the number of deltas; no delta
    is kept after :meth:`add` returns. The division by the total weight is left to the server
    update (:attr:`Combined.scale`), which applies it in the same pass that adds the base.
    """

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
        if len(delta) != len(self._sums):
            raise ValueError(f"{len(delta)} arrays, the base has {len(self._sums)}")
        first = self._weight == 0
        for total, array in zip(self._sums, delta, strict=True):
            if total is not None:
                _add_scaled(total.reshape(-1), np.ravel(array), weight * scale, self._scratch, first)
        self._weight += weight

    def result(self) -> Combined | None:
        if self._weight == 0:
            return None
        return Combined(list(self._sums), 1.0 / self._weight)


def _add_scaled(
    total: np.ndarray, flat: np.ndarray, factor: float, scratch: np.ndarray, replace: bool
) -> None:
    """``total += factor * flat`` (``=`` when ``replace``) in float64, block by block through ``scratch``.

    Converting into the cache-resident scratch and multiplying there in place is faster than one
    mixed-dtype ``np.multiply`` (numpy's casting loop runs in small buffered chunks), and no
    temporary of an array's size is ever allocated.
    """
    for start in range(0, total.size, scratch.size):
        stop = min(start + scratch.size, total.size)
        part = total[start:stop]
        if replace:
            np.copyto(part, flat[start:stop])
            part *= factor
            continue
        work = scratch[: stop - start]
        np.copyto(work, flat[start:stop])
        work *= factor
        part += work
