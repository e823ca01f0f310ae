"""Checks every delta passes before it counts (the coordinator never trusts a worker's numbers).

A delta must match its base version's layout exactly (array count, shapes, dtypes), hold only
finite values, have an L2 norm under the configured bound, and claim a sample count within the
cap. :func:`validate_delta` returns the norm, or raises :class:`DeltaRejectedError` with the reason the
coordinator records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import FedmqError
from coordinator.strategies.combiners import is_averaged, l2_norm


class DeltaRejectedError(FedmqError):
    """A delta that must not count; ``reason`` is recorded with it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DeltaPolicy:
    """Bounds for deltas; ``max_norm`` None means no bound."""

    max_norm: float | None = None
    max_sample_count: int = 10_000_000


def validate_delta(
    delta: Sequence[np.ndarray],
    base: Sequence[np.ndarray],
    sample_count: int,
    policy: DeltaPolicy = DeltaPolicy(),
) -> float:
    """Return the delta's L2 norm, or raise DeltaRejectedError saying what is wrong."""
    if len(delta) != len(base):
        raise DeltaRejectedError(f"{len(delta)} arrays, the base version has {len(base)}")
    if sample_count <= 0:
        raise DeltaRejectedError(f"sample count {sample_count} is not positive")
    if sample_count > policy.max_sample_count:
        raise DeltaRejectedError(f"sample count {sample_count} exceeds the cap of {policy.max_sample_count}")
    for i, (d, b) in enumerate(zip(delta, base, strict=True)):
        if d.shape != b.shape or d.dtype != b.dtype:
            raise DeltaRejectedError(
                f"array {i}: {d.dtype} {d.shape}, the base version has {b.dtype} {b.shape}"
            )
    # One blockwise pass (float64 sums, no copy of the delta); a NaN or an infinity makes it
    # non-finite, and only then are the arrays searched for the reason.
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        for i, d in enumerate(delta):
            if is_averaged(d) and not np.isfinite(d).all():
                raise DeltaRejectedError(f"array {i}: holds NaN or infinite values")
        raise DeltaRejectedError("L2 norm overflows float64")
    if policy.max_norm is not None and norm > policy.max_norm:
        raise DeltaRejectedError(f"L2 norm {norm:.4g} exceeds the bound {policy.max_norm:.4g}")
    return norm
