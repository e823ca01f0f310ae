"""The model and the training both sides of the benchmark share: softmax regression, one SGD epoch.

The same maths as fedmq's ``common.model.numpy_model`` (init, mini-batch SGD on cross-entropy,
the weights updated in place by BLAS ``sgemm`` where scipy is there), copied here because the
Flower app runs in its own venv without fedmq installed (the bench installs scipy there too).
"""

from __future__ import annotations

import numpy as np

try:
    from scipy.linalg.blas import sgemm
except ImportError:  # numpy alone: one temporary the size of the weights
    sgemm = None


def init_weights(n_in: int, n_out: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 0.01, size=(n_in, n_out)).astype("float32"), np.zeros(n_out, "float32")]


def local_data(node: int, samples: int, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark's synthetic local data of worker ``node`` (identical on the fedmq side)."""
    rng = np.random.default_rng(1000 + node)
    return rng.normal(0.0, 1.0, size=(samples, n_in)).astype("float32"), rng.integers(0, n_out, samples)


def sgd_epoch(
    weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, lr: float, batch_size: int = 32
) -> list[np.ndarray]:
    w, b = weights[0].copy(), weights[1].copy()
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = xb @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        probs[np.arange(len(yb)), yb] -= 1.0
        b -= lr * probs.mean(axis=0)
        step = lr / len(xb)
        if sgemm is not None and w.dtype == probs.dtype == np.float32 and w.flags.c_contiguous:
            out = sgemm(-step, probs, xb, beta=1.0, c=w.T, trans_a=1, overwrite_c=1)
            if not np.shares_memory(out, w):
                w[...] = out.T
        else:
            w -= xb.T @ (probs * step)
    return [w, b]
