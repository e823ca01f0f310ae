"""fedmq's model format against the real PyPI package dafne-dl (1.4a2 and 2.0.2b2), both ways.

dafne-dl runs in its own virtualenv (``tests/interop/dafne_env.py``); this process has fedmq and no
dafne-dl, which the first test checks so that "loads where dafne-dl is not installed" is honest.
Each direction costs one dafne-dl subprocess per version (module-scoped fixtures).

Both sides build the same small Keras classifier from ``dafne_side/keras_digits.py``. The blobs
dafne-dl writes keep dafne-dl's own default Keras functions, whose sources import from ``dafne_dl``
inside their bodies and name ``DynamicDLModel`` in annotations.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dill
import numpy as np
import pytest

from common.errors import UnsupportedModelTypeError
from common.model import DynamicDLModel, IncompatibleModelError
from tests.interop.dafne_env import DAFNE_VERSIONS, DafneEnv
from tests.interop.dafne_side import keras_digits

pytestmark = pytest.mark.interop

#: dafne-dl 1.4 passes every blob key to a constructor without these 2.x parameters.
LAYOUT_FOR_VERSION = {"1.4a2": "1.4", "2.0.2b2": "2"}
KEYS_2X_ONLY = {"data_dimensionality", "type", "metadata"}

#: Same TensorFlow and Keras on both sides; different processes may still pick different kernels.
OUTPUT_ATOL = 1e-6
TRAINED_RTOL, TRAINED_ATOL = 1e-5, 1e-6

FEDMQ_MODEL_ID = "fedmq-built-digits"
FEDMQ_TIMESTAMP = 1_700_000_456


@dataclass(frozen=True)
class DafneRun:
    """What one dafne-side script wrote: arrays, a JSON summary, and the directory."""

    version: str
    directory: Path
    arrays: dict[str, np.ndarray]
    results: dict[str, Any]

    def weights(self, name: str) -> list[np.ndarray]:
        return [self.arrays[f"{name}{i}"] for i in range(self.results["n_weights"])]

    def blob(self, file_name: str) -> bytes:
        return (self.directory / file_name).read_bytes()


def _read_run(version: str, directory: Path) -> DafneRun:
    with np.load(directory / "results.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    results = json.loads((directory / "results.json").read_text())
    return DafneRun(version, directory, arrays, results)


def _assert_same_weights(actual: list[np.ndarray], expected: list[np.ndarray], **tolerance: float) -> None:
    assert len(actual) == len(expected)
    for i, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert np.shape(got) == want.shape, f"array {i}"
        if tolerance:
            np.testing.assert_allclose(got, want, err_msg=f"array {i}", **tolerance)
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"array {i}")


def _learn(model: DynamicDLModel, run: DafneRun) -> None:
    model.incremental_learn(
        run.arrays["x_train"], run.arrays["y_train"], keras_digits.BATCH_SIZE, keras_digits.MIN_TRAIN_IMAGES
    )


@pytest.fixture(scope="module", params=DAFNE_VERSIONS)
def dafne_written(request: pytest.FixtureRequest, dafne_env: DafneEnv, tmp_path_factory) -> DafneRun:
    """Blobs written by dafne-dl ``version`` and what dafne-dl computed with them."""
    version = request.param
    out_dir = tmp_path_factory.mktemp(f"dafne-written-{version}")
    dafne_env.run(version, "make_blobs.py", str(out_dir))
    return _read_run(version, out_dir)


@dataclass(frozen=True)
class FedmqWritten:
    """A model fedmq built and exported, and what dafne-dl computed after loading the export."""

    model: DynamicDLModel
    blob: bytes
    x_apply: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray
    dafne: DafneRun


@pytest.fixture(scope="module", params=DAFNE_VERSIONS)
def fedmq_written(request: pytest.FixtureRequest, dafne_env: DafneEnv, tmp_path_factory) -> FedmqWritten:
    """A fedmq model (fedmq's own default Keras functions) exported for ``version`` and loaded there."""
    version = request.param
    work = tmp_path_factory.mktemp(f"fedmq-written-{version}")
    x_apply, x_train, y_train = keras_digits.make_data(seed=7)
    model = DynamicDLModel(
        FEDMQ_MODEL_ID,
        keras_digits.init_model_function,
        keras_digits.apply_model_function,
        incremental_learn_function=keras_digits.incremental_learn_function,
        timestamp_id=FEDMQ_TIMESTAMP,
    )
    blob = model.dumps(layout=LAYOUT_FOR_VERSION[version])
    (work / "model.dafne").write_bytes(blob)
    np.savez(
        work / "inputs.npz",
        x_apply=x_apply,
        x_train=x_train,
        y_train=y_train,
        batch_size=keras_digits.BATCH_SIZE,
        min_train_images=keras_digits.MIN_TRAIN_IMAGES,
    )
    out_dir = work / "out"
    dafne_env.run(version, "load_blob.py", str(work / "model.dafne"), str(work / "inputs.npz"), str(out_dir))
    return FedmqWritten(model, blob, x_apply, x_train, y_train, _read_run(version, out_dir))


def test_dafne_dl_is_not_installed_where_fedmq_runs() -> None:
    assert importlib.util.find_spec("dafne_dl") is None


# dafne-dl writes, fedmq reads -------------------------------------------------------------------


def test_dafne_blob_carries_dafne_dl_default_sources(dafne_written: DafneRun) -> None:
    fields = dill.loads(dafne_written.blob("model.dafne"))

    assert "from dafne_dl.interfaces import IncompatibleModelError" in fields["calc_delta_function"]
    assert "lhs: DynamicDLModel" in fields["calc_delta_function"]
    assert "modelObj: DynamicDLModel" in fields["weights_to_model_function"]
    if dafne_written.version.startswith("1."):
        assert not KEYS_2X_ONLY & fields.keys()
    else:
        assert fields["type"] == "DynamicDLModel"


def test_dafne_model_blob_loads_with_same_outputs_weights_and_ids(dafne_written: DafneRun) -> None:
    model = DynamicDLModel.Loads(dafne_written.blob("model.dafne"))

    outputs = model(dafne_written.arrays["x_apply"])

    np.testing.assert_allclose(outputs, dafne_written.arrays["base_out"], rtol=0, atol=OUTPUT_ATOL)
    _assert_same_weights(model.get_weights(), dafne_written.weights("base_w"))
    assert model.model_id == dafne_written.results["model_id"]
    assert model.timestamp_id == dafne_written.results["base"]["timestamp_id"]
    assert model.is_delta is False
    assert importlib.util.find_spec("dafne_dl") is None


def test_dafne_delta_blob_loads_as_delta_of_the_base(dafne_written: DafneRun) -> None:
    delta = DynamicDLModel.Loads(dafne_written.blob("delta.dafne"))

    assert delta.is_delta is True
    assert delta.timestamp_id == dafne_written.results["base"]["timestamp_id"]
    assert delta.timestamp_id != dafne_written.results["trained"]["timestamp_id"]
    _assert_same_weights(delta.get_weights(), dafne_written.weights("delta_w"))


def test_delta_arithmetic_on_dafne_blobs_matches_dafne(dafne_written: DafneRun) -> None:
    base = DynamicDLModel.Loads(dafne_written.blob("model.dafne"))
    delta = DynamicDLModel.Loads(dafne_written.blob("delta.dafne"))
    trained = base.copy()
    trained.set_weights(dafne_written.weights("trained_w"))
    trained.timestamp_id = dafne_written.results["trained"]["timestamp_id"]

    rebuilt = base + delta
    recomputed_delta = trained - base
    halved = base * 0.5

    assert "from dafne_dl.interfaces import" in base.function_sources()["calc_delta_function"]
    _assert_same_weights(rebuilt.get_weights(), dafne_written.weights("rebuilt_w"))
    _assert_same_weights(rebuilt.get_weights(), dafne_written.weights("trained_w"), rtol=0, atol=1e-6)
    assert rebuilt.is_delta is False
    rebuilt_out = rebuilt(dafne_written.arrays["x_apply"])
    np.testing.assert_allclose(rebuilt_out, dafne_written.arrays["rebuilt_out"], rtol=0, atol=OUTPUT_ATOL)
    _assert_same_weights(recomputed_delta.get_weights(), dafne_written.weights("delta_w"))
    assert recomputed_delta.is_delta is True
    assert recomputed_delta.timestamp_id == dafne_written.results["base"]["timestamp_id"]
    _assert_same_weights(halved.get_weights(), dafne_written.weights("halved_w"))


def test_dafne_delta_function_refuses_another_model_with_fedmq_error(dafne_written: DafneRun) -> None:
    base = DynamicDLModel.Loads(dafne_written.blob("model.dafne"))
    other = base.copy()
    other.model_id = "another-model"

    with pytest.raises(IncompatibleModelError):
        other - base


def test_incremental_learn_runs_the_dafne_written_function(dafne_written: DafneRun) -> None:
    model = DynamicDLModel.Loads(dafne_written.blob("model.dafne"))
    x_train, y_train = dafne_written.arrays["x_train"], dafne_written.arrays["y_train"]
    loss_before = keras_digits.cross_entropy(model(x_train), y_train)

    _learn(model, dafne_written)

    assert keras_digits.cross_entropy(model(x_train), y_train) < loss_before
    _assert_same_weights(
        model.get_weights(), dafne_written.weights("trained_w"), rtol=TRAINED_RTOL, atol=TRAINED_ATOL
    )
    np.testing.assert_allclose(
        model(dafne_written.arrays["x_apply"]),
        dafne_written.arrays["trained_out"],
        rtol=TRAINED_RTOL,
        atol=TRAINED_ATOL,
    )


def test_dafne_torch_blob_is_refused_naming_its_type(dafne_written: DafneRun) -> None:
    if not dafne_written.results["torch_blob"]:
        assert dafne_written.version.startswith("1."), "dafne-dl 2.x should have written a torch blob"
        return  # dafne-dl 1.4 has no torch models
    with pytest.raises(UnsupportedModelTypeError, match="DynamicTorchModel"):
        DynamicDLModel.Loads(dafne_written.blob("torch.dafne"))


def test_torch_typed_blob_is_refused_naming_its_type() -> None:
    blob = dill.dumps(
        {
            "model_id": "a-torch-model",
            "weights": {},
            "timestamp_id": 1_700_000_000,
            "is_delta": False,
            "data_dimensionality": 2,
            "type": "DynamicTorchModel",
            "metadata": {},
            "init_model_function": "def init_model_function():\n    import torch\n",
            "apply_model_function": "def apply_model_function(modelObj, data):\n    return data\n",
        }
    )

    with pytest.raises(UnsupportedModelTypeError, match="DynamicTorchModel"):
        DynamicDLModel.Loads(blob)


# fedmq writes, dafne-dl reads -------------------------------------------------------------------


def test_fedmq_blob_has_the_layout_of_the_dafne_version(fedmq_written: FedmqWritten) -> None:
    keys = set(dill.loads(fedmq_written.blob).keys())

    if fedmq_written.dafne.version.startswith("1."):
        assert not KEYS_2X_ONLY & keys
    else:
        assert keys >= KEYS_2X_ONLY
    assert set(fedmq_written.dafne.results["blob_keys"]) == keys


def test_fedmq_blob_loads_in_dafne_with_same_outputs_weights_and_ids(fedmq_written: FedmqWritten) -> None:
    dafne = fedmq_written.dafne

    assert all(dafne.results["functions_compiled"].values()), dafne.results["functions_compiled"]
    np.testing.assert_allclose(
        dafne.arrays["loaded_out"], fedmq_written.model(fedmq_written.x_apply), rtol=0, atol=OUTPUT_ATOL
    )
    _assert_same_weights(dafne.weights("loaded_w"), fedmq_written.model.get_weights())
    assert dafne.results["model_id"] == FEDMQ_MODEL_ID
    assert dafne.results["loaded"] == {"timestamp_id": FEDMQ_TIMESTAMP, "is_delta": False}


def test_fedmq_blob_learns_incrementally_in_dafne(fedmq_written: FedmqWritten) -> None:
    dafne = fedmq_written.dafne
    here = fedmq_written.model.copy()

    here.incremental_learn(
        fedmq_written.x_train, fedmq_written.y_train, keras_digits.BATCH_SIZE, keras_digits.MIN_TRAIN_IMAGES
    )

    assert dafne.results["loss_after"] < dafne.results["loss_before"]
    _assert_same_weights(dafne.weights("trained_w"), here.get_weights(), rtol=TRAINED_RTOL, atol=TRAINED_ATOL)


def test_fedmq_default_delta_functions_run_in_dafne(fedmq_written: FedmqWritten) -> None:
    dafne = fedmq_written.dafne
    trained, base = dafne.weights("trained_w"), dafne.weights("loaded_w")

    assert dafne.results["delta"] == {"timestamp_id": FEDMQ_TIMESTAMP, "is_delta": True}
    assert dafne.results["rebuilt"]["is_delta"] is False
    _assert_same_weights(dafne.weights("delta_w"), [t - b for t, b in zip(trained, base, strict=True)])
    _assert_same_weights(dafne.weights("rebuilt_w"), trained, rtol=0, atol=1e-6)
    assert any(not np.array_equal(t, b) for t, b in zip(trained, base, strict=True))
