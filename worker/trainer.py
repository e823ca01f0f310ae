"""What a worker does with a model: learn on local data and compute the delta; apply for jobs.

Kept free of messaging so it can be tested alone. Training uses the model's own
``incremental_learn_function``; the delta is ``trained - base`` computed by the model's own
``calc_delta_function`` (dafne-dl's contract), as a weight list for the codec.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import IncompatibleModelError, ModelError
from common.model import DynamicDLModel
from common.model.defaults import default_keras_delta_function, default_keras_weight_copy_function
from common.model.source import fn_to_source
from worker.data import LocalData

_DEFAULT_DELTA_SOURCE = fn_to_source(default_keras_delta_function)


@dataclass(frozen=True)
class TrainingResult:
    delta: list[np.ndarray]
    sample_count: int
    metrics: dict[str, float]


def _accuracy(model: DynamicDLModel, data: LocalData, limit: int = 2000) -> float | None:
    """Accuracy of a classifier on (a sample of) the local data, or None if outputs are not classes."""
    x, y = data.x[:limit], data.y[:limit]
    try:
        out = np.asarray(model(x))
    except Exception:  # model code may not support batch apply; metrics are optional
        return None
    if out.ndim != 2 or len(out) != len(y) or not np.issubdtype(y.dtype, np.integer):
        return None
    return float((out.argmax(axis=1) == y).mean())


def train(model: DynamicDLModel, data: LocalData, options: dict[str, Any] | None = None) -> TrainingResult:
    """Learn on ``data``, in place, and return ``delta = trained - base`` and metrics.

    ``model`` is trained in place (the worker builds a fresh one from the verified release for
    every task); ``base`` is its weights on entry, kept as a copy by the model's own
    ``weight_copy_function``. Building no second model matters: a dafne model's constructor runs
    its ``init_model_function``, which for a large model costs more than the training.

    Options: ``epochs`` (default 1; each epoch is one call of the model's incremental learning),
    ``batch_size`` (default 32), ``max_samples`` (use at most this many local samples),
    ``proximal_mu`` (FedProx, default 0: after each epoch the weights are pulled towards the base,
    see :func:`proximal_pull`).
    """
    options = dict(options or {})
    if not model.can_incremental_learn():
        raise ModelError(f"model {model.model_id!r} has no incremental_learn_function")
    epochs = int(options.get("epochs", 1))
    batch_size = int(options.get("batch_size", 32))
    mu = float(options.get("proximal_mu", 0.0))
    x, y = data.x, data.y
    if "max_samples" in options:
        x, y = x[: int(options["max_samples"])], y[: int(options["max_samples"])]
    local = LocalData(x, y, data.files)
    base = _weight_list(model, model.weight_copy_function)
    before = _accuracy(model, local)
    started = time.perf_counter()
    for _ in range(max(1, epochs)):
        model.incremental_learn(x, y, batch_size, 1)
        if mu > 0:
            model.set_weights(proximal_pull(_weight_list(model), base, mu))
    seconds = time.perf_counter() - started
    after = _accuracy(model, local)
    delta = calc_delta(model, base)
    metrics = {"train_seconds": seconds, "epochs": float(epochs)}
    if mu > 0:
        metrics["proximal_mu"] = mu
    if before is not None and after is not None:
        metrics.update(local_accuracy_before=before, local_accuracy_after=after)
    return TrainingResult(delta=delta, sample_count=len(x), metrics=metrics)


def calc_delta(trained: DynamicDLModel, base: list[np.ndarray]) -> list[np.ndarray]:
    """``trained - base`` as a weight list, by the model's own ``calc_delta_function``.

    When that function is fedmq's default (dafne-dl's arithmetic, recognised by its source text),
    its arithmetic runs here directly: the same subtraction and checks, without the output model
    the function builds (``get_empty_copy``, one more ``init_model_function``). Any other function
    gets a model holding ``base`` and runs as dafne-dl would run it.
    """
    weights = [np.asarray(w) for w in trained.get_weights()]
    if getattr(trained.calc_delta_function, "source", None) == _DEFAULT_DELTA_SOURCE:
        if len(weights) != len(base):
            raise IncompatibleModelError(f"{len(weights)} arrays against {len(base)}")
        for depth, (left, right) in enumerate(zip(weights, base, strict=True)):
            if left.shape != right.shape:
                raise IncompatibleModelError(f"array {depth}: shape {left.shape} against {right.shape}")
        return [np.subtract(left, right) for left, right in zip(weights, base, strict=True)]
    base_model = trained.get_empty_copy()
    base_model.set_weights(base)
    return [np.asarray(w) for w in (trained - base_model).get_weights()]


def proximal_pull(weights: list[np.ndarray], anchor: list[np.ndarray], mu: float) -> list[np.ndarray]:
    """FedProx's proximal step: ``anchor + (w - anchor) / (1 + mu)`` for each floating-point array.

    FedProx (Li et al., 2020) minimises ``F(w) + mu/2 * ||w - anchor||^2`` locally, where F is the
    local loss. The model's learning code is opaque (a dafne ``incremental_learn_function``: Keras
    ``fit``, numpy SGD, ...), so the term cannot be added to its loss or gradients. Instead each
    epoch of the model's own training (a forward step on F) is followed by the exact proximal step
    of the quadratic term, ``argmin_u mu/2 ||u - anchor||^2 + 1/2 ||u - w||^2``, which is this
    formula: proximal gradient descent, needing nothing from the model but ``get_weights`` and
    ``set_weights``. Each epoch's drift from the base shrinks by ``1 / (1 + mu)``. Its fixed point
    solves ``gamma * grad F(w) + mu * (w - anchor) = 0``, where gamma is the epoch's effective step
    (learning rate times steps): the paper's coefficient is ``mu / gamma``, so ``mu`` here is a
    pull per epoch, independent of the model's optimizer. Integer arrays (counters) are left as
    trained.
    """
    if len(weights) != len(anchor):
        raise ModelError(f"proximal term: {len(weights)} weight arrays, the base has {len(anchor)}")
    pulled = []
    for w, a in zip(weights, anchor, strict=True):
        if np.issubdtype(w.dtype, np.floating):
            pulled.append((a + (w - a) / (1.0 + mu)).astype(w.dtype, copy=False))
        else:
            pulled.append(w)
    return pulled


def _weight_list(
    model: DynamicDLModel, copy: Callable[[Any], Any] = default_keras_weight_copy_function
) -> list[np.ndarray]:
    """A copy of the model's weights as a list of arrays (``copy``: the model's own copy function)."""
    weights = model.get_weights()
    if not isinstance(weights, list | tuple):
        raise ModelError(f"model {model.model_id!r}: training needs weights as a list of arrays")
    return [np.asarray(w) for w in copy(weights)]


def apply(model: DynamicDLModel, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Apply the model to each input array; results as arrays for the codec."""
    return [np.asarray(model(np.asarray(x))) for x in inputs]
