"""The worker's training step: in-place learning, the delta against the weights on entry."""

from __future__ import annotations

import numpy as np
import pytest

from common.model import DynamicDLModel
from common.model.numpy_model import make_linear_model
from worker.data import LocalData
from worker.trainer import train


def _data(n_in: int = 6, n_out: int = 3, n: int = 48) -> LocalData:
    rng = np.random.default_rng(4)
    return LocalData(rng.normal(size=(n, n_in)).astype(np.float32), rng.integers(0, n_out, n), ())


def test_the_delta_is_trained_minus_the_weights_on_entry_and_the_model_keeps_the_trained_weights():
    model = make_linear_model(6, 3)
    base = [np.array(w, copy=True) for w in model.get_weights()]

    result = train(model, _data(), {"epochs": 2, "batch_size": 8})

    trained = model.get_weights()
    assert any(np.abs(t - b).max() > 1e-4 for t, b in zip(trained, base, strict=True))
    for d, t, b in zip(result.delta, trained, base, strict=True):
        assert d.dtype == b.dtype and d.shape == b.shape
        np.testing.assert_array_equal(d, t - b)
    assert result.sample_count == 48


def test_training_with_the_default_delta_function_initialises_no_second_model(monkeypatch):
    model = make_linear_model(6, 3)
    inits: list[str] = []
    original = DynamicDLModel.init_model
    monkeypatch.setattr(DynamicDLModel, "init_model", lambda self: (inits.append("init"), original(self))[1])

    train(model, _data(), {"epochs": 1})

    assert inits == []


def test_a_models_own_delta_function_is_used():
    halved_delta = """def calc_delta_function(lhs, rhs, threshold=None):
    import numpy as np
    out = lhs.get_empty_copy()
    out.set_weights([(np.asarray(a) - np.asarray(b)) / 2 for a, b in zip(lhs.get_weights(), rhs.get_weights())])
    out.is_delta = True
    return out
"""
    plain_model = make_linear_model(6, 3)
    custom = make_linear_model(6, 3)
    custom.set_internal_fn("calc_delta_function", halved_delta)

    plain = train(plain_model, _data(), {"epochs": 1, "batch_size": 8})
    halved = train(custom, _data(), {"epochs": 1, "batch_size": 8})

    for p, h in zip(plain.delta, halved.delta, strict=True):
        np.testing.assert_allclose(h, p / 2, rtol=1e-6, atol=1e-8)


def test_a_model_without_incremental_learning_is_refused():
    model = make_linear_model(6, 3)
    model.incremental_learn_function = None

    with pytest.raises(Exception, match="no incremental_learn_function"):
        train(model, _data())
