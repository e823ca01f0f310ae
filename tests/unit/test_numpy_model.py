"""The numpy softmax regression's SGD: the in-place BLAS update is the textbook step, and the
Flower side of ``fedmq bench round`` trains exactly as fedmq's model does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from common.model.numpy_model import make_linear_model

FLOWER_APP = Path(__file__).resolve().parents[2] / "coordinator" / "bench" / "flower_app"


def _textbook_epoch(weights, bias, x, y, lr, bs):
    """``W -= lr * (x.T @ g) / n`` per mini-batch, with every temporary, in float64."""
    w, b = weights.astype(np.float64), bias.astype(np.float64)
    for start in range(0, len(x), bs):
        xb, yb = x[start : start + bs].astype(np.float64), y[start : start + bs]
        logits = xb @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        probs[np.arange(len(yb)), yb] -= 1.0
        w -= lr * (xb.T @ probs) / len(xb)
        b -= lr * probs.mean(axis=0)
    return w, b


def _data(n: int = 37, n_in: int = 50, n_out: int = 7):
    rng = np.random.default_rng(11)
    return rng.normal(size=(n, n_in)).astype(np.float32), rng.integers(0, n_out, n)


@pytest.mark.parametrize("scipy_blas", [True, False], ids=["sgemm", "numpy-only"])
def test_an_epoch_updates_the_weights_in_place_as_the_textbook_step(monkeypatch, scipy_blas):
    if not scipy_blas:
        monkeypatch.setitem(sys.modules, "scipy.linalg.blas", None)  # the import inside fails
    x, y = _data()
    model = make_linear_model(50, 7, learning_rate=0.3)
    weights, bias = model.model
    start_w, start_b = weights.copy(), bias.copy()

    model.incremental_learn(x, y, 8, 1)

    expected_w, expected_b = _textbook_epoch(start_w, start_b, x, y, 0.3, 8)
    trained_w, trained_b = model.get_weights()
    assert trained_w is weights  # in place: no copy of the weights was made
    assert np.abs(trained_w - start_w).max() > 1e-3
    np.testing.assert_allclose(trained_w, expected_w, rtol=0, atol=1e-6)
    np.testing.assert_allclose(trained_b, expected_b, rtol=0, atol=1e-6)


def test_the_flower_app_trains_as_fedmqs_model(monkeypatch):
    monkeypatch.syspath_prepend(str(FLOWER_APP))
    from fedmq_flower_bench.task import init_weights, sgd_epoch

    x, y = _data()
    model = make_linear_model(50, 7, learning_rate=0.1)
    initial = init_weights(50, 7)
    for ours, theirs in zip(model.get_weights(), initial, strict=True):
        np.testing.assert_array_equal(ours, theirs)

    theirs = sgd_epoch(initial, x, y, 0.1, batch_size=32)
    model.incremental_learn(x, y, 32, 1)

    assert np.abs(theirs[0] - initial[0]).max() > 1e-3  # sgd_epoch trains a copy
    for ours, flower in zip(model.get_weights(), theirs, strict=True):
        np.testing.assert_array_equal(ours, flower)
