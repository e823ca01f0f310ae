"""A Keras classifier for scikit-learn's 8x8 digits, written as dafne-dl model functions.

``fedmq models register`` loads this file and calls :func:`make_model`. Every function imports
what it needs inside its body, so the model's code travels as text and runs on any worker.
"""

from __future__ import annotations

from common.model import DynamicDLModel


def init_model_function():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(64,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.05),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def apply_model_function(modelObj, data):
    import numpy as np

    x = data["image"] if isinstance(data, dict) else data
    return modelObj.model.predict(np.asarray(x, dtype="float32"), verbose=0)


def incremental_learn_function(modelObj, trainingData, trainingOutputs, bs=5, minTrainImages=5):
    import numpy as np

    x = np.asarray(trainingData, dtype="float32")
    y = np.asarray(trainingOutputs).astype("int64")
    if len(x) < minTrainImages:
        return
    epochs = int(modelObj.metadata.get("epochs", 1))
    modelObj.model.fit(x, y, batch_size=int(bs), epochs=epochs, verbose=0, shuffle=True)


def make_model() -> DynamicDLModel:
    """The digits model, version 1 (random initial weights from a fixed seed)."""
    return DynamicDLModel(
        "fedmq-demo-digits",
        init_model_function,
        apply_model_function,
        incremental_learn_function=incremental_learn_function,
        data_dimensionality=1,
        metadata={
            "description": "Keras MLP for scikit-learn's 8x8 digits",
            "epochs": 1,
            "inputs": "64 pixel intensities scaled to [0, 1]",
            "classes": 10,
        },
    )
