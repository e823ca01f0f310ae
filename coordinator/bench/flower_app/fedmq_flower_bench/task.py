"""The model and the training both sides of the benchmark share: softmax regression, one SGD epoch.

The same maths as fedmq's ``common.model.numpy_model`` (init, mini-batch SGD on cross-entropy),
copied here because the Flower app runs in its own venv without fedmq installed.
"""

from __future__ import annotations

import numpy as np


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
        w -= lr * (xb.T @ probs) / len(xb)
        b -= lr * probs.mean(axis=0)
    return [w, b]
