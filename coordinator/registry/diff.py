"""Comparing two weight lists array by array (what `fedmq models diff` prints)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coordinator.registry.records import LayerDiff


def layer_diffs(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[LayerDiff]:
    """Per-array L2 norm of ``b - a`` (in float64), and relative to ``a``'s norm.

    Arrays present in only one list, or whose shapes differ, get ``l2=None``. Memory: one float64
    temporary of the largest array at a time.
    """
    out: list[LayerDiff] = []
    empty = np.zeros(0)
    for index in range(max(len(a), len(b))):
        wa = a[index] if index < len(a) else empty
        wb = b[index] if index < len(b) else empty
        comparable = index < len(a) and index < len(b) and wa.shape == wb.shape
        l2 = relative = None
        if comparable:
            l2 = float(np.linalg.norm(np.subtract(wb, wa, dtype=np.float64).ravel()))
            base = float(np.linalg.norm(np.asarray(wa, dtype=np.float64).ravel()))
            relative = l2 / base if base > 0 else None
        out.append(
            LayerDiff(
                index=index,
                shape_a=tuple(wa.shape),
                shape_b=tuple(wb.shape),
                dtype=str(wb.dtype if index < len(b) else wa.dtype),
                l2=l2,
                relative=relative,
            )
        )
    return out
