"""Keras models as DynamicDLModel: the digits model, and wrapping a saved .keras file."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from common.errors import ModelError
from common.model import DynamicDLModel
from common.model.keras_model import model_from_keras_file


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype("float32")
    return x[:1400], d.target[:1400], x[1400:], d.target[1400:]


def accuracy(model: DynamicDLModel, x: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(model(x)).argmax(axis=1) == y).mean())


def test_digits_model_learns_and_survives_delta_and_blob(digits):
    from coordinator.demo.digits_model import make_model

    x_train, y_train, x_test, y_test = digits
    model = make_model()
    base = model.copy()
    before = accuracy(model, x_test, y_test)

    model.incremental_learn(x_train, y_train, 16, 5)
    delta = model - base
    rebuilt = DynamicDLModel.Loads(base.dumps()) + DynamicDLModel.Loads(delta.dumps())

    after = accuracy(model, x_test, y_test)
    assert after > before + 0.3
    np.testing.assert_allclose(rebuilt(x_test), model(x_test), atol=1e-5)


def test_a_saved_keras_file_is_wrapped_with_its_architecture_as_code(tmp_path, digits):
    x_train, y_train, x_test, _ = digits
    net = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax")])
    net.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    net.fit(x_train, y_train, epochs=1, verbose=0)
    path = tmp_path / "digits.keras"
    net.save(path)

    wrapped = model_from_keras_file(path)
    loaded = DynamicDLModel.Loads(wrapped.dumps())
    loaded.incremental_learn(x_train[:100], y_train[:100], 10, 5)

    assert wrapped.model_id == "digits"
    np.testing.assert_allclose(wrapped(x_test), net.predict(x_test, verbose=0), atol=1e-6)
    assert not np.allclose(loaded.get_weights()[0], wrapped.get_weights()[0])


def test_an_unreadable_keras_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match=r"broken\.keras: not a readable Keras model"):
        model_from_keras_file(bad)
    with pytest.raises(ModelError, match="no such file"):
        model_from_keras_file(tmp_path / "missing.keras")
