"""Byzantine-robust combiners, computed over coordinate blocks so memory stays bounded.

These rules need every delta at once, so they keep the deltas as given (the engine's read-only
arrays, views over the buffers read from SQL: holding n deltas costs n models, where FedAvg holds
one running sum). Nothing is ever stacked whole: each float array is cut into blocks of coordinates,
and one block of every delta is copied (scaled by its clipping factor, in float64) into one reused
``(n, block)`` matrix of at most :data:`BLOCK_BYTES`; the rule runs on that matrix. Sample counts do
not weight these rules (a Byzantine worker would lie about them too).

- :class:`Median`: coordinate-wise median.
- :class:`TrimmedMean`: coordinate-wise mean after dropping the ``floor(beta * n)`` largest and
  smallest values.
- :class:`MultiKrum` (Blanchard et al., 2017): squared distances between deltas are accumulated block
  by block; a delta's score is the sum of its squared distances to its ``n - f - 2`` nearest others;
  the ``m`` lowest-scoring deltas are averaged (``m = 1`` is Krum).
- :class:`Bulyan` (El Mhamdi et al., 2018): ``theta = n - 2f`` deltas chosen by Krum repeatedly,
  then per coordinate the mean of the ``theta - 2f`` values closest to their median.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import numpy as np

from coordinator.strategies.combiners import Combined, Combiner

logger = logging.getLogger(__name__)

BlockRule = Callable[[np.ndarray], np.ndarray]
"""Reduces an ``(n, b)`` block matrix (which it may overwrite) to ``b`` values."""

BLOCK_BYTES = 64 * 2**20
"""Size of the ``(n, block)`` float64 matrix a robust rule works on (its temporaries add about 2x)."""


class HeldDeltas(Combiner):
    """Keeps references to the deltas and their clipping scales; walks them block by block."""

    def __init__(self, base: Sequence[np.ndarray], block_bytes: int = BLOCK_BYTES) -> None:
        super().__init__(base)
        self._block_bytes = block_bytes
        self.deltas: list[list[np.ndarray]] = []
        self.scales: list[float] = []

    def add(self, delta: Sequence[np.ndarray], weight: float, scale: float = 1.0) -> None:
        if weight > 0:
            self.deltas.append(list(delta))
            self.scales.append(scale)

    def blocks(self, rows: Sequence[int]) -> Iterator[tuple[int, slice, np.ndarray]]:
        """``(array index, coordinate slice, matrix)``: row r of the matrix is ``scale * delta`` there.

        The matrix is reused from one block to the next: consume it before asking for the next.
        """
        largest = max(
            (int(np.prod(shape)) for avg, shape in zip(self.averaged, self.shapes, strict=True) if avg),
            default=1,
        )
        coords = max(1, min(largest, self._block_bytes // (8 * len(rows))))
        buffer = np.empty(len(rows) * coords, dtype=np.float64)
        for j, averaged in enumerate(self.averaged):
            if not averaged:
                continue
            flats = [np.ravel(self.deltas[r][j]) for r in rows]
            size = flats[0].size
            for start in range(0, size, coords):
                stop = min(start + coords, size)
                matrix = buffer[: len(rows) * (stop - start)].reshape(len(rows), stop - start)
                for out, r, flat in zip(matrix, rows, flats, strict=True):
                    np.copyto(out, flat[start:stop])
                    if self.scales[r] != 1.0:
                        out *= self.scales[r]
                yield j, slice(start, stop), matrix

    def reduce(self, rows: Sequence[int], rule: BlockRule) -> Combined:
        """Apply ``rule`` (an ``(n, b)`` matrix to ``b`` values) to every block of ``rows``."""
        out: list[np.ndarray | None] = [
            np.empty(shape, dtype=np.float64) if averaged else None
            for averaged, shape in zip(self.averaged, self.shapes, strict=True)
        ]
        for j, where, matrix in self.blocks(rows):
            target = out[j]
            assert target is not None
            target.reshape(-1)[where] = rule(matrix)
        return Combined(out)

    def squared_distances(self) -> np.ndarray:
        """The ``(n, n)`` matrix of squared L2 distances, accumulated block by block (Gram form)."""
        n = len(self.deltas)
        dist = np.zeros((n, n), dtype=np.float64)
        for _, _, matrix in self.blocks(range(n)):
            gram = matrix @ matrix.T
            norms = np.diag(gram).copy()
            dist += norms[:, None]
            dist += norms[None, :]
            dist -= 2 * gram
        np.maximum(dist, 0.0, out=dist)
        np.fill_diagonal(dist, 0.0)
        return dist

    def result(self) -> Combined | None:
        raise NotImplementedError


class Median(HeldDeltas):
    def result(self) -> Combined | None:
        if not self.deltas:
            return None
        return self.reduce(range(len(self.deltas)), _median)


class TrimmedMean(HeldDeltas):
    def __init__(self, base: Sequence[np.ndarray], beta: float, block_bytes: int = BLOCK_BYTES) -> None:
        super().__init__(base, block_bytes)
        self.beta = beta

    def result(self) -> Combined | None:
        n = len(self.deltas)
        if n == 0:
            return None
        trim = min(int(self.beta * n), (n - 1) // 2)

        def trimmed(matrix: np.ndarray) -> np.ndarray:
            matrix.sort(axis=0)
            return matrix[trim : n - trim].mean(axis=0)

        return self.reduce(range(n), trimmed)


class MultiKrum(HeldDeltas):
    """Average of the ``m`` deltas with the lowest Krum scores (``m`` None: ``n - f``)."""

    def __init__(
        self, base: Sequence[np.ndarray], f: int, m: int | None, block_bytes: int = BLOCK_BYTES
    ) -> None:
        super().__init__(base, block_bytes)
        self.f, self.m = f, m

    def result(self) -> Combined | None:
        n = len(self.deltas)
        if n == 0:
            return None
        if n < 2 * self.f + 3:
            logger.warning(
                "krum: %d deltas for f=%d; the bound needs n >= 2f+3 = %d", n, self.f, 2 * self.f + 3
            )
        m = n - self.f if self.m is None else self.m
        m = max(1, min(m, n))
        scores = krum_scores(self.squared_distances(), list(range(n)), self.f)
        chosen = sorted(int(i) for i in np.argsort(scores, kind="stable")[:m])
        logger.info("krum: chose deltas %s of %d", chosen, n)
        return self.reduce(chosen, _mean)


class Bulyan(HeldDeltas):
    def __init__(self, base: Sequence[np.ndarray], f: int, block_bytes: int = BLOCK_BYTES) -> None:
        super().__init__(base, block_bytes)
        self.f = f

    def result(self) -> Combined | None:
        n = len(self.deltas)
        if n == 0:
            return None
        if n < 4 * self.f + 3:
            logger.warning(
                "bulyan: %d deltas for f=%d; the bound needs n >= 4f+3 = %d", n, self.f, 4 * self.f + 3
            )
        dist = self.squared_distances()
        remaining, chosen = list(range(n)), []
        for _ in range(max(1, n - 2 * self.f)):
            best = remaining[int(np.argmin(krum_scores(dist, remaining, self.f)))]
            chosen.append(best)
            remaining.remove(best)
        chosen.sort()
        keep = max(1, len(chosen) - 2 * self.f)
        return self.reduce(chosen, partial(_closest_to_median, keep=keep))


def krum_scores(dist: np.ndarray, candidates: list[int], f: int) -> np.ndarray:
    """Each candidate's sum of squared distances to its ``len(candidates) - f - 2`` nearest others."""
    count = len(candidates)
    if count == 1:
        return np.zeros(1)
    neighbours = min(max(1, count - f - 2), count - 1)
    sub = dist[np.ix_(candidates, candidates)]
    np.fill_diagonal(sub, np.inf)
    return _snap(np.sort(sub, axis=1)[:, :neighbours].sum(axis=1))


def _snap(scores: np.ndarray) -> np.ndarray:
    """Scores rounded to 36 significant bits, so that equal scores (mutual nearest neighbours) tie
    exactly whatever the block size's rounding, and ties go to the lowest index."""
    mantissa, exponent = np.frexp(scores)
    return np.ldexp(np.round(mantissa * 2.0**36) / 2.0**36, exponent)


def _median(matrix: np.ndarray) -> np.ndarray:
    """Coordinate-wise median (sorting the block in place is several times faster than np.median)."""
    matrix.sort(axis=0)
    n = len(matrix)
    if n % 2:
        return matrix[n // 2].copy()
    return (matrix[n // 2 - 1] + matrix[n // 2]) / 2


def _closest_to_median(matrix: np.ndarray, keep: int) -> np.ndarray:
    """Per coordinate, the mean of the ``keep`` values closest to the median.

    In a sorted column those values form a window of ``keep`` consecutive rows; of the windows that
    could hold them, the one whose farther end is nearest the median is taken (ties: the lowest).
    """
    median = _median(matrix)  # sorts the matrix in place
    starts = len(matrix) - keep + 1
    reach = np.stack([np.maximum(median - matrix[s], matrix[s + keep - 1] - median) for s in range(starts)])
    best = np.argmin(reach, axis=0)[None, :]
    total = np.zeros(matrix.shape[1])
    for offset in range(keep):
        total += np.take_along_axis(matrix, best + offset, axis=0)[0]
    return total / keep


def _mean(matrix: np.ndarray) -> np.ndarray:
    return matrix.mean(axis=0)
