"""Wrapping Keras models as ``DynamicDLModel``: from a model in memory or a ``.keras`` file.

The architecture travels as source text: :func:`from_keras_model` generates an
``init_model_function`` that rebuilds the model from its JSON config (and re-compiles it from its
compile config), so the result is self-contained like any dafne model. Layers must be Keras
built-ins (a custom layer class would not exist where the blob is loaded). TensorFlow/Keras is
imported only inside these functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.errors import ModelError
from common.model.dynamic import DynamicDLModel
from common.model.source import model_function

_INIT_TEMPLATE = """def init_model_function():
    import json

    import keras

    model = keras.models.model_from_json({architecture!r})
    compile_config = json.loads({compile_config!r})
    if compile_config:
        model.compile_from_config(compile_config)
    return model
"""


@model_function
def keras_apply_model_function(modelObj, data):
    """Model outputs for ``data``: an array of samples, or a dict holding it under ``image``."""
    import numpy as np

    x = data["image"] if isinstance(data, dict) else data
    return modelObj.model.predict(np.asarray(x, dtype="float32"), verbose=0)


@model_function
def keras_incremental_learn_function(modelObj, trainingData, trainingOutputs, bs=5, minTrainImages=5):
    """``fit`` for ``metadata['epochs']`` epochs (default 1); skipped below ``minTrainImages`` samples."""
    import numpy as np

    x = np.asarray(trainingData, dtype="float32")
    y = np.asarray(trainingOutputs)
    if len(x) < minTrainImages:
        return
    epochs = int(modelObj.metadata.get("epochs", 1))
    modelObj.model.fit(x, y, batch_size=int(bs), epochs=epochs, verbose=0, shuffle=True)


def from_keras_model(
    keras_model: Any,
    model_id: str,
    metadata: dict[str, Any] | None = None,
    incremental: bool = True,
) -> DynamicDLModel:
    """Wrap an in-memory Keras model: architecture as source, current weights as the weights."""
    try:
        architecture = keras_model.to_json()
        compile_config = keras_model.get_compile_config() if getattr(keras_model, "compiled", False) else None
        compile_json = json.dumps(compile_config)
    except (TypeError, ValueError, AttributeError, NotImplementedError) as exc:
        raise ModelError(f"cannot serialize the Keras model's architecture: {exc}") from exc
    init_source = _INIT_TEMPLATE.format(architecture=architecture, compile_config=compile_json)
    return DynamicDLModel(
        model_id,
        init_source,
        keras_apply_model_function,
        incremental_learn_function=keras_incremental_learn_function if incremental else None,
        weights=keras_model.get_weights(),
        data_dimensionality=max(1, len(keras_model.input_shape) - 2)
        if isinstance(getattr(keras_model, "input_shape", None), tuple)
        else 2,
        metadata=dict(metadata or {}),
    )


def model_from_keras_file(path: str | Path, model_id: str | None = None) -> DynamicDLModel:
    """Wrap a saved Keras model (``.keras``) with fedmq's default functions."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        import keras

        keras_model = keras.saving.load_model(path, compile=True)
    except ImportError as exc:
        raise ModelError("Keras models need TensorFlow: install fedmq[cpu] or fedmq[gpu]") from exc
    except Exception as exc:  # Keras raises many types for unreadable files
        raise ModelError(f"{path}: not a readable Keras model ({type(exc).__name__}: {exc})") from exc
    return from_keras_model(keras_model, model_id or path.stem, metadata={"source_file": path.name})
