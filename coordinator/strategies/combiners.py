"""Combiners turn a round's deltas into one aggregated delta; :class:`WeightedMean` streams.

A combiner sees each delta once through :meth:`Combiner.add` with a weight (the sample count, or 1)
and a scale (the clipping factor, applied lazily so that no delta is copied). :meth:`Combiner.result`
returns a :class:`Combined`: one floating-point array per averaged (floating-point) base array and
None for the others, times a scale; or None altogether when nothing was added.

:class:`WeightedMean` keeps one running sum per array, so its memory is one model whatever the
number of deltas. The sums are in the model's own precision by default (``accumulate="float32"``:
float32 for arrays of 32 bits or fewer), or in float64 on request; see :func:`accumulator_dtype`
for why float32 is the default and what it costs in accuracy.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController

CACHE_BLOCK_BYTES = 1 << 18
_BLAS_MAX_N = 1 << 30
"""Bytes per block of the blockwise passes (the streaming mean, the server step): 256 KiB, so a
block of the sums and of the delta (or of a float64 scratch buffer) stay in a 1 MiB L2 cache."""

SCRATCH_COORDS = CACHE_BLOCK_BYTES // 8
"""Coordinates per block of float64 scratch work (the clip norm, the DP noise)."""

ACCUMULATE_CHOICES = ("float32", "float64")
"""Values of the ``accumulate`` option of the mean-based strategies; the first is the default."""


def is_averaged(array: np.ndarray) -> bool:
    """Whether a weight array takes part in aggregation (floating point) or keeps its base value."""
    return bool(np.issubdtype(array.dtype, np.floating))


def accumulator_dtype(dtype: np.dtype, accumulate: str) -> np.dtype:
    """The dtype of the running sum for a floating-point array of ``dtype``.

    ``"float32"`` (the default): float32 sums for arrays of 32 bits or fewer (float64 for wider
    ones). They move 4 bytes per coordinate instead of 8 and need no conversion, which is what lets
    the mean run near memory speed (``fedmq bench aggregate``: FedAvg above 0.5x of ``a += b``,
    float64 sums about 0.2x). Each add rounds at most twice (``saxpy``'s product and sum), so the
    mean of N deltas is off by about ``sqrt(N) * 2**-24`` of the deltas' weighted mean magnitude
    per coordinate (``2 N 2**-24`` at worst); tests/unit/test_strategies_fedavg.py checks that 1000
    deltas stay within ``2 sqrt(N) 2**-24`` of an exact mean. For deltas small against the weights
    this is below the rounding of the new weights to float32 anyway.

    ``"float64"``: float64 sums for every array (each product exact, the sums rounded to float64),
    twice the size of a float32 model.
    """
    if accumulate not in ACCUMULATE_CHOICES:
        raise ValueError(f"accumulate must be one of {ACCUMULATE_CHOICES}, not {accumulate!r}")
    if accumulate == "float32" and np.dtype(dtype).itemsize <= 4:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def l2_norm(delta: Sequence[np.ndarray]) -> float:
    """L2 norm over every floating-point array of ``delta``, summed in float64 block by block.

    ``einsum`` rather than ``np.dot``: a BLAS call per small block costs more than the block's work.
    """
    squares = 0.0
    averaged = [array for array in delta if is_averaged(array)]
    # no larger than the delta: a small one (the common case at a high delta rate) allocates little
    scratch = np.empty(min(SCRATCH_COORDS, max((a.size for a in averaged), default=1) or 1), dtype=np.float64)
    for array in averaged:
        flat = np.ravel(array)
        for start in range(0, flat.size, scratch.size):
            work = scratch[: min(scratch.size, flat.size - start)]
            np.copyto(work, flat[start : start + scratch.size])
            squares += float(np.einsum("i,i->", work, work))
    return float(np.sqrt(squares))


@dataclass
class Combined:
    """An aggregated delta: ``scale * arrays[j]`` for each averaged array j (None for the others).

    The arrays are floating point (float32 at least; float64 from the robust rules and under
    ``accumulate="float64"``) and belong to the receiver, which may overwrite them.
    """

    arrays: list[np.ndarray | None]
    scale: float = 1.0


class Combiner(ABC):
    """Combines deltas into one aggregated delta (floating-point arrays; None for non-averaged ones)."""

    #: Whether :meth:`add` keeps references to the deltas (the robust rules need them all at once).
    holds_deltas: bool = True

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
    """``sum_i(w_i * s_i * delta_i) / sum_i(w_i)``, streamed into running sums.

    - When every sum is float32 (the default for a float32 model), each delta is added to the
      sums with BLAS ``saxpy`` (``sums += g * delta`` with ``g = w * s``, one pass in SIMD: the
      memory traffic of ``a += b``), the first one written as ``g * delta`` into fresh sums.
    - Otherwise (``accumulate="float64"``, or a float64 array in the model) each block
      (:data:`CACHE_BLOCK_BYTES`) of the delta is multiplied by ``g`` into a reused scratch block in
      the sums' dtype (a float32 value times an integer weight is exact in float64), then added.

    No delta is kept after :meth:`add` returns. The division by the total weight is left to the
    server update, which applies it in the same pass that adds the base.
    """

    holds_deltas = False

    def __init__(self, base: Sequence[np.ndarray], accumulate: str = ACCUMULATE_CHOICES[0]) -> None:
        super().__init__(base)
        self._sums: list[np.ndarray | None] = [
            np.empty(b.shape, dtype=accumulator_dtype(b.dtype, accumulate)) if avg else None
            for avg, b in zip(self.averaged, base, strict=True)
        ]
        self._axpy = all(t.dtype == np.float32 for t in self._sums if t is not None)
        self._coords = sum(t.size for t in self._sums if t is not None)
        self._scratch = np.empty(SCRATCH_COORDS, dtype=np.float64)
        self._weight = 0.0
        self._started = False  # the sums hold something (they are uninitialised before)

    def add(self, delta: Sequence[np.ndarray], weight: float, scale: float = 1.0) -> None:
        if weight <= 0:
            return
        if len(delta) != len(self._sums):
            raise ValueError(f"{len(delta)} arrays, the base has {len(self._sums)}")
        contribution = weight * scale
        with _single_blas_thread() if self._coords >= _BLAS_LIMIT_MIN_COORDS else contextlib.nullcontext():
            for total, array in zip(self._sums, delta, strict=True):
                if total is None:
                    continue
                flat, sums = np.ravel(array), total.reshape(-1)
                if not self._started:
                    np.multiply(flat, contribution, out=sums, dtype=sums.dtype)
                elif self._axpy:
                    _saxpy(flat, sums, contribution)
                else:
                    _add_scaled(sums, flat, contribution, self._scratch)
        self._started = True
        self._weight += weight

    def result(self) -> Combined | None:
        if self._weight == 0:
            return None
        return Combined(list(self._sums), 1.0 / self._weight)


@functools.cache
def _blas_threads() -> ThreadpoolController:
    return ThreadpoolController()


_BLAS_LIMIT_MIN_COORDS = 1 << 16
"""Deltas smaller than this are added without limiting BLAS's threads: their sums take a few
microseconds, less than setting the thread count of each BLAS library twice (threadpoolctl)."""


def _single_blas_thread() -> contextlib.AbstractContextManager[object]:
    """BLAS on one thread while a delta is added: ``saxpy`` is bound by memory, and a second
    thread only contends with the workers and the broker sharing the machine (measured here:
    one thread 7 ms per 100 MB, two threads 11 ms on a busy machine; ``a += b`` 6 ms)."""
    return _blas_threads().limit(limits=1, user_api="blas")


def _saxpy(flat: np.ndarray, sums: np.ndarray, factor: float) -> None:
    """``sums += factor * flat`` in place (float32, contiguous ``sums``) by BLAS ``saxpy``."""
    if flat.dtype != np.float32:
        flat = flat.astype(np.float32)
    for start in range(0, sums.size, _BLAS_MAX_N):  # BLAS counts in 32-bit integers
        part = sums[start : start + _BLAS_MAX_N]
        out = blas.saxpy(flat[start : start + _BLAS_MAX_N], part, a=factor)
        if not np.shares_memory(out, part):  # never expected: scipy writes a contiguous y in place
            part[...] = out


def _add_scaled(total: np.ndarray, flat: np.ndarray, factor: float, scratch: np.ndarray) -> None:
    """``total += factor * flat`` in ``total``'s dtype, block by block through ``scratch``
    (viewed in ``total``'s dtype; ``dtype=`` converts a float32 delta before multiplying it into
    float64 sums)."""
    work = scratch.view(total.dtype)
    convert = None if flat.dtype == total.dtype else total.dtype
    step = CACHE_BLOCK_BYTES // total.itemsize
    for start in range(0, total.size, step):
        part = total[start : start + step]
        scaled = work[: part.size]
        np.multiply(flat[start : start + step], factor, out=scaled, dtype=convert)
        part += scaled
