"""A small Keras classifier written as dafne-dl model functions, plus its deterministic data.

The three functions are written in dafne-dl's style: top-level, self-contained (every import inside
the body), because a dafne blob stores each function as its source text and runs it with no module
globals. Both sides use this one module: ``make_blobs.py`` builds a dafne-dl model from it inside the
dafne-dl environment, and the interop tests build a fedmq model from it in fedmq's environment.

This file runs under both interpreters and imports nothing outside the standard library and numpy
at module level.
"""

import numpy as np

N_FEATURES = 64
N_CLASSES = 10
BATCH_SIZE = 8
MIN_TRAIN_IMAGES = 5


def init_model_function():
    import keras

    keras.utils.set_random_seed(20240611)
    inputs = keras.Input(shape=(64,), name="pixels")
    hidden = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax", name="classes")(hidden)
    return keras.Model(inputs, outputs, name="digits")


def apply_model_function(modelObj, data):
    import numpy as np

    x = np.asarray(data, dtype=np.float32).reshape(-1, 64)
    return np.asarray(modelObj.model(x, training=False), dtype=np.float32)


def incremental_learn_function(modelObj, trainingData, trainingOutputs, bs=8, minTrainImages=5):
    import keras
    import numpy as np

    x = np.asarray(trainingData, dtype=np.float32).reshape(-1, 64)
    y = np.asarray(trainingOutputs).astype(np.int64).reshape(-1)
    if len(x) < minTrainImages:
        print("incremental_learn: not enough training images", len(x))
        return
    keras.utils.set_random_seed(42)
    modelObj.model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="sparse_categorical_crossentropy"
    )
    modelObj.model.fit(x, y, batch_size=bs, epochs=3, shuffle=False, verbose=0)


def make_data(seed=0, n_apply=16, n_train=48):
    """Digits-like data: 64 pixel intensities in [0, 1] around one random prototype per class.

    Returns ``(x_apply, x_train, y_train)``; the same seed gives the same arrays on any machine.
    """
    rng = np.random.RandomState(seed)
    prototypes = rng.randint(0, 17, size=(N_CLASSES, N_FEATURES)).astype(np.float64)

    def sample(n):
        labels = rng.randint(0, N_CLASSES, size=n)
        noisy = prototypes[labels] + rng.normal(0.0, 3.0, size=(n, N_FEATURES))
        return (np.clip(noisy, 0, 16) / 16.0).astype(np.float32), labels.astype(np.int64)

    x_apply, _ = sample(n_apply)
    x_train, y_train = sample(n_train)
    return x_apply, x_train, y_train


def cross_entropy(probabilities, labels):
    """Mean sparse categorical cross-entropy of predicted class probabilities."""
    p = np.asarray(probabilities, dtype=np.float64)
    picked = p[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))
