"""Norm clipping and the Gaussian mechanism of DP-FedAvg with fixed clipping (McMahan et al., 2018).

Clipping scales a delta by ``min(1, clip / ||delta||_2)``, the norm taken over all floating-point
arrays together. The scale is handed to the combiner with the delta, so no delta is copied.

With ``n`` clipped deltas averaged with equal weights, one client changes the mean by at most
``clip / n`` in L2; adding ``N(0, (z * clip / n)^2)`` to every coordinate of the mean is the
Gaussian mechanism with noise multiplier ``z`` (the privacy accounting over rounds is the user's).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from coordinator.strategies.combiners import SCRATCH_COORDS, is_averaged, l2_norm


def clip_scale(delta: Sequence[np.ndarray], clip: float | None) -> float:
    """The factor that brings ``delta``'s L2 norm down to ``clip`` (1.0 when already within)."""
    if clip is None:
        return 1.0
    norm = l2_norm(delta)
    return 1.0 if norm <= clip else clip / norm


def noise_generator(seed: int | None, base: Sequence[np.ndarray]) -> np.random.Generator:
    """Fresh OS entropy, or, with ``seed``, a generator keyed by the seed and the base weights.

    Keying by the base weights makes a seeded run reproducible while every round (whose base
    differs) draws different noise.
    """
    if seed is None:
        return np.random.default_rng()
    digest = hashlib.blake2b(digest_size=16)
    for array in base:
        digest.update(np.ascontiguousarray(array).data)
    return np.random.default_rng([seed, int.from_bytes(digest.digest(), "little")])


def add_gaussian_noise(delta: list[np.ndarray | None], std: float, rng: np.random.Generator) -> None:
    """Add ``N(0, std^2)`` to every coordinate of the arrays of ``delta`` (drawn in float64), block by block."""
    scratch = np.empty(SCRATCH_COORDS, dtype=np.float64)
    for array in delta:
        if array is None or not is_averaged(array):
            continue
        flat = array.reshape(-1)
        for start in range(0, flat.size, scratch.size):
            stop = min(start + scratch.size, flat.size)
            noise = scratch[: stop - start]
            rng.standard_normal(out=noise)
            noise *= std
            part = flat[start:stop]
            part += noise
