"""A small softmax-regression model in plain numpy, as a ``DynamicDLModel``.

It needs no TensorFlow, so unit tests, benchmarks and the coordinator's own checks can build,
train, delta and aggregate real models quickly. Its functions follow dafne-dl's rules (imports
inside the bodies); ``init_model_function`` reads its layer sizes from the source text that
:func:`make_linear_model` generates, since dafne's ``init_model_function`` takes no arguments.
"""

from __future__ import annotations

from typing import Any

from common.model.defaults import NUMPY_DEFAULTS
from common.model.dynamic import DynamicDLModel
from common.model.source import model_function

_INIT_TEMPLATE = """def init_model_function():
    import numpy as np
    rng = np.random.default_rng({seed})
    weights = rng.normal(0.0, 0.01, size=({n_in}, {n_out})).astype("float32")
    bias = np.zeros({n_out}, dtype="float32")
    return [weights, bias]
"""


@model_function
def linear_apply_model_function(modelObj, data):
    """Class probabilities for ``data`` (an array of rows, or a dict with ``image``)."""
    import numpy as np

    x = data["image"] if isinstance(data, dict) else data
    x = np.asarray(x, dtype="float32").reshape(len(x), -1)
    weights, bias = modelObj.model
    logits = x @ weights + bias
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


@model_function
def linear_incremental_learn_function(modelObj, trainingData, trainingOutputs, bs=5, minTrainImages=5):
    """One epoch of mini-batch SGD on cross-entropy; skipped below ``minTrainImages`` samples.

    The weights are updated in place by BLAS ``sgemm`` (``W += -step * x.T @ g``) where scipy is
    there: a large model's update then makes no temporary of the weights' size (100 MB weights:
    ~0.03 s against ~0.09 s for ``W -= lr * (x.T @ g) / n`` here).
    """
    import numpy as np

    try:
        from scipy.linalg.blas import sgemm
    except ImportError:  # numpy alone: one temporary the size of the weights
        sgemm = None

    x = np.asarray(trainingData, dtype="float32").reshape(len(trainingData), -1)
    y = np.asarray(trainingOutputs).astype("int64").reshape(-1)
    if len(x) < minTrainImages:
        return
    lr = float(modelObj.metadata.get("learning_rate", 0.1))
    weights, bias = modelObj.model
    for start in range(0, len(x), max(1, int(bs))):
        xb, yb = x[start : start + bs], y[start : start + bs]
        logits = xb @ weights + bias
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        probs[np.arange(len(yb)), yb] -= 1.0
        bias -= lr * probs.mean(axis=0)
        step = lr / len(xb)
        if sgemm is not None and weights.dtype == probs.dtype == np.float32 and weights.flags.c_contiguous:
            # weights.T is Fortran-ordered: BLAS adds -step * probs.T @ xb into it, in place
            out = sgemm(-step, probs, xb, beta=1.0, c=weights.T, trans_a=1, overwrite_c=1)
            if not np.shares_memory(out, weights):  # not expected: f2py writes such a c in place
                weights[...] = out.T
        else:
            weights -= xb.T @ (probs * step)
    modelObj.model = [weights, bias]


def make_linear_model(
    n_in: int,
    n_out: int,
    model_id: str = "linear",
    seed: int = 0,
    learning_rate: float = 0.1,
    metadata: dict[str, Any] | None = None,
) -> DynamicDLModel:
    """A softmax regression ``n_in -> n_out`` with float32 weights, learning by SGD."""
    meta = {"learning_rate": learning_rate, **(metadata or {})}
    init_source = _INIT_TEMPLATE.format(seed=int(seed), n_in=int(n_in), n_out=int(n_out))
    return DynamicDLModel(
        model_id,
        init_source,
        linear_apply_model_function,
        incremental_learn_function=linear_incremental_learn_function,
        data_dimensionality=1,
        metadata=meta,
        weights_to_model_function=NUMPY_DEFAULTS["weights_to_model_function"],
        model_to_weights_function=NUMPY_DEFAULTS["model_to_weights_function"],
    )
