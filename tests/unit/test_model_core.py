"""The dafne-dl compatible model core, on numpy models (no TensorFlow)."""

from __future__ import annotations

import io
import subprocess
import sys

import dill
import numpy as np
import pytest

from common.errors import (
    BlobError,
    DecodeError,
    IncompatibleModelError,
    ModelCodeError,
    UnsupportedModelTypeError,
)
from common.model import DynamicDLModel
from common.model.bundle import ModelCode, join_model, split_model
from common.model.numpy_model import make_linear_model


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0).astype("int64")
    return x, y


def weights_equal(a: DynamicDLModel, b: DynamicDLModel) -> bool:
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))


def test_delta_then_apply_gives_back_the_trained_model(data):
    x, y = data
    base = make_linear_model(4, 3)
    trained = base.copy()
    trained.incremental_learn(x, y, 8, 5)

    delta = trained - base
    rebuilt = base + delta

    assert delta.is_delta and not base.is_delta
    assert delta.timestamp_id == base.timestamp_id
    assert all(
        np.allclose(r, t, atol=1e-7)
        for r, t in zip(rebuilt.get_weights(), trained.get_weights(), strict=True)
    )
    np.testing.assert_allclose(rebuilt(x), trained(x), atol=1e-6)


def test_incremental_learning_improves_accuracy_and_skips_tiny_batches(data):
    x, y = data
    model = make_linear_model(4, 3, learning_rate=0.5)
    before = float((model(x).argmax(1) == y).mean())

    for _ in range(20):
        model.incremental_learn(x, y, 10, 5)
    untouched = model.copy()
    untouched.incremental_learn(x[:3], y[:3], 10, 5)

    assert float((model(x).argmax(1) == y).mean()) > before + 0.2
    assert weights_equal(untouched, model)


@pytest.mark.parametrize("factor", [2, 0.5, np.float32(0.5), np.float64(3.0), np.int64(2)])
def test_multiplication_by_any_real_number_on_either_side(factor):
    model = make_linear_model(4, 3, seed=3)

    left, right = model * factor, factor * model

    for scaled in (left, right):
        assert isinstance(scaled, DynamicDLModel)
        for got, orig in zip(scaled.get_weights(), model.get_weights(), strict=True):
            np.testing.assert_allclose(got, orig * float(factor), rtol=1e-6)
            assert got.dtype == orig.dtype


def test_multiplication_by_a_non_number_is_refused():
    model = make_linear_model(4, 3)
    with pytest.raises(NotImplementedError):
        model * "2"
    with pytest.raises(NotImplementedError):
        model * True


def test_models_with_different_ids_or_shapes_are_incompatible():
    a = make_linear_model(4, 3, model_id="a")
    b = make_linear_model(4, 3, model_id="b")
    c = make_linear_model(5, 3, model_id="a")

    with pytest.raises(IncompatibleModelError, match="model ids differ"):
        a - b
    with pytest.raises(IncompatibleModelError, match="shape"):
        a - c
    with pytest.raises(IncompatibleModelError):
        a + b


def test_copy_is_independent_and_empty_copy_keeps_identity():
    model = make_linear_model(4, 3)
    clone = model.copy()
    clone.model[0][:] = 7.0

    empty = model.get_empty_copy()

    assert not np.any(model.get_weights()[0] == 7.0)
    assert empty.timestamp_id == model.timestamp_id and empty.model_id == model.model_id
    assert empty.metadata == model.metadata and empty.metadata is not model.metadata


def test_metadata_is_completed_like_dafne():
    model = make_linear_model(4, 3, metadata={"organ": "thigh"})
    meta = model.get_metadata()
    assert meta["organ"] == "thigh"
    assert meta["type"] == "DynamicDLModel"
    assert meta["dimensionality"] == "1"
    assert meta["can_incremental_learn"] is True
    assert model.can_incremental_learn()


@pytest.mark.parametrize("layout", ["2", "1.4"])
def test_blob_round_trip_in_both_layouts(layout, data):
    x, _ = data
    model = make_linear_model(4, 3, seed=5)
    model.timestamp_id = 1234

    blob = model.dumps(layout=layout)
    loaded = DynamicDLModel.Loads(blob)
    from_file = DynamicDLModel.Load(io.BytesIO(blob))

    fields = dill.loads(blob)
    expected_2x = {"data_dimensionality", "type", "metadata"}
    assert expected_2x <= set(fields) if layout == "2" else not (expected_2x & set(fields))
    assert all(isinstance(fields[k], str) for k in ("init_model_function", "apply_model_function"))
    for m in (loaded, from_file):
        assert m.timestamp_id == 1234 and m.is_delta is False
        assert weights_equal(m, model)
        np.testing.assert_array_equal(m(x), model(x))


DAFNE_STYLE_DELTA = """def default_keras_delta_function(lhs: DynamicDLModel, rhs: DynamicDLModel, threshold=None):
    from dafne_dl.interfaces import IncompatibleModelError
    if lhs.model_id != rhs.model_id: raise IncompatibleModelError
    lhs_weights = lhs.get_weights()
    rhs_weights = rhs.get_weights()
    newWeights = []
    for depth in range(len(lhs_weights)):
        delta = lhs_weights[depth] - rhs_weights[depth]
        if threshold is not None:
            delta[np.abs(delta) < threshold] = 0
        newWeights.append(delta)
    outputObj = lhs.get_empty_copy()
    outputObj.set_weights(newWeights)
    outputObj.is_delta = True
    outputObj.timestamp_id = rhs.timestamp_id
    return outputObj
"""

OLD_DL_MULTIPLY = """def mult(lhs, rhs):
    from dl.DynamicDLModel import DynamicDLModel as Cls
    assert isinstance(lhs, Cls)
    out = lhs.get_empty_copy()
    out.set_weights([w * rhs for w in lhs.get_weights()])
    return out
"""


def test_dafne_style_sources_run_without_dafne_dl_installed():
    """dafne's default sources import dafne_dl inside the body and use np and annotations."""
    import importlib.util

    assert importlib.util.find_spec("dafne_dl") is None
    model = make_linear_model(4, 3)
    fields = dill.loads(model.dumps())
    fields["calc_delta_function"] = DAFNE_STYLE_DELTA
    fields["factor_multiply_function"] = OLD_DL_MULTIPLY
    loaded = DynamicDLModel.Loads(dill.dumps(fields))
    other = make_linear_model(4, 3, model_id="other")

    delta = loaded.calc_delta(model, threshold=1e-9)
    doubled = loaded * 2

    assert delta.is_delta and all(np.all(w == 0) for w in delta.get_weights())
    np.testing.assert_allclose(doubled.get_weights()[0], model.get_weights()[0] * 2)
    with pytest.raises(IncompatibleModelError):
        loaded.calc_delta(other)


def test_a_source_that_does_not_compile_names_the_function():
    fields = dill.loads(make_linear_model(4, 3).dumps())
    fields["apply_model_function"] = "def apply(modelObj, data):\n    return (\n"

    with pytest.raises(ModelCodeError, match=r"apply_model_function.*does not compile"):
        DynamicDLModel.Loads(dill.dumps(fields))


def test_a_source_without_a_function_is_an_error_not_a_string():
    fields = dill.loads(make_linear_model(4, 3).dumps())
    fields["incremental_learn_function"] = "x = 1\n"

    with pytest.raises(ModelCodeError, match=r"incremental_learn_function.*defines no function"):
        DynamicDLModel.Loads(dill.dumps(fields))


def test_unsupported_model_type_is_named():
    fields = dill.loads(make_linear_model(4, 3).dumps())
    fields["type"] = "DynamicTorchModel"

    with pytest.raises(UnsupportedModelTypeError, match="DynamicTorchModel"):
        DynamicDLModel.Loads(dill.dumps(fields))


@pytest.mark.parametrize("blob", [b"", b"not a pickle", dill.dumps([1, 2, 3]), dill.dumps({"weights": []})])
def test_garbage_blobs_give_a_blob_error(blob):
    with pytest.raises(BlobError):
        DynamicDLModel.Loads(blob)


def test_code_and_weights_split_and_join(data):
    x, _ = data
    model = make_linear_model(4, 3, seed=9, metadata={"b": 1, "a": {"z": 2, "y": [1, 2]}})

    code, weights = split_model(model)
    again, _ = split_model(model.copy())
    parsed = ModelCode.from_bytes(code.to_bytes())
    rebuilt = join_model(parsed, weights, timestamp_id=77)

    assert code.to_bytes() == again.to_bytes() and code.sha256 == again.sha256
    assert parsed == code
    assert rebuilt.timestamp_id == 77
    np.testing.assert_array_equal(rebuilt(x), model(x))


@pytest.mark.parametrize("raw", [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa4type\xa3foo"])
def test_model_code_garbage_is_a_decode_error(raw):
    with pytest.raises(DecodeError):
        ModelCode.from_bytes(raw)


def test_importing_the_model_core_does_not_import_tensorflow():
    code = (
        "import sys, common.model, common.model.bundle, common.model.numpy_model;"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
