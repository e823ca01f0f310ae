"""Server-side evaluation: each new version's metrics on a held-out dataset, recorded in its lineage.

A run may name a held-out ``.npz`` file (arrays ``x`` and ``y``) on the coordinator's machine. After
aggregating a round, the coordinator builds the new version from the model's registered (signed,
trusted) code and evaluates it:

* if the model's metadata carries ``evaluate_function`` — the source of
  ``def evaluate(modelObj, x, y) -> dict[str, float]``, self-contained like every model function —
  its result is recorded;
* otherwise, for a classifier whose ``apply`` returns one row of class scores per sample, the
  accuracy (``eval_accuracy``) and the mean cross-entropy of the scores (``eval_loss``).
"""

from __future__ import annotations

import logging
import math
import zipfile
from pathlib import Path

import numpy as np

from common.errors import ConfigError
from common.model.bundle import ModelCode, join_model
from common.model.source import compile_function

logger = logging.getLogger(__name__)


def load_eval_data(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return np.asarray(npz["x"]), np.asarray(npz["y"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(
            f"evaluation data {path}: needs a readable .npz with arrays x and y ({exc})"
        ) from exc


def evaluate(
    code: ModelCode, weights: list[np.ndarray], data: tuple[np.ndarray, np.ndarray]
) -> dict[str, float]:
    """Metrics of ``code`` with ``weights`` on ``data`` (see the module docstring)."""
    model = join_model(code, [np.array(w) for w in weights])
    x, y = data
    source = code.metadata.get("evaluate_function")
    if isinstance(source, str):
        function = compile_function(source, "evaluate_function")
        result = function(model, x, y)
        return {f"eval_{k}": float(v) for k, v in dict(result).items() if isinstance(v, int | float)}
    scores = np.asarray(model(x))
    if scores.ndim != 2 or len(scores) != len(y) or not np.issubdtype(np.asarray(y).dtype, np.integer):
        logger.warning("evaluation skipped: the model's outputs are not class scores")
        return {}
    metrics = {"eval_accuracy": float((scores.argmax(axis=1) == y).mean())}
    picked = scores[np.arange(len(y)), y.astype(np.int64)]
    if np.all(picked >= 0) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        loss = float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))
        if math.isfinite(loss):
            metrics["eval_loss"] = loss
    return metrics
