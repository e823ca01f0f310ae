"""Run inside the dafne-dl environment: write dafne-dl blobs and what dafne-dl computed with them.

Usage: python make_blobs.py OUT_DIR

Builds the ``keras_digits`` classifier as a dafne-dl ``DynamicDLModel`` that keeps dafne-dl's OWN
default Keras functions (weights in/out, delta, add, copy, multiply: their sources import from
``dafne_dl`` inside their bodies and name ``DynamicDLModel`` in annotations), then writes to OUT_DIR:

- ``model.dafne``   the base model, dumped by dafne-dl;
- ``delta.dafne``   ``trained - base`` after one incremental-learning step, dumped by dafne-dl;
- ``torch.dafne``   (dafne-dl 2.x only) a tiny ``DynamicTorchModel``, whose weights are torch tensors;
- ``results.npz``   the inputs, dafne-dl's outputs and weights (base, trained, delta, base + delta,
                    base * 0.5);
- ``results.json``  model_id, timestamp_id and is_delta of each, counts, and dafne-dl's version.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dafne_dl
import keras_digits
from dafne_dl import DynamicDLModel

MODEL_ID = "fedmq-interop-digits"
BASE_TIMESTAMP = 1_700_000_000
TRAINED_TIMESTAMP = 1_700_000_321


def torch_init_model_function():
    import torch

    torch.manual_seed(0)
    return torch.nn.Linear(64, 10)


def torch_apply_model_function(modelObj, data):
    import torch

    with torch.no_grad():
        return modelObj.model(torch.as_tensor(data)).numpy()


def write_torch_blob(path):
    """Write a dafne-dl torch model blob, if this dafne-dl release has torch models (2.x)."""
    if not hasattr(dafne_dl, "DynamicTorchModel"):
        return False
    model = dafne_dl.DynamicTorchModel(
        "fedmq-interop-torch", torch_init_model_function, torch_apply_model_function
    )
    with open(path, "wb") as f:
        model.dump(f)
    return True


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    x_apply, x_train, y_train = keras_digits.make_data()

    # Only the arguments both 1.4 and 2.x accept; every other function is dafne-dl's default.
    base = DynamicDLModel(
        MODEL_ID,
        keras_digits.init_model_function,
        keras_digits.apply_model_function,
        incremental_learn_function=keras_digits.incremental_learn_function,
        timestamp_id=BASE_TIMESTAMP,
    )
    base_out = base(x_apply)
    base_weights = base.get_weights()

    trained = base.copy()
    trained.incremental_learn(x_train, y_train, keras_digits.BATCH_SIZE, keras_digits.MIN_TRAIN_IMAGES)
    trained.timestamp_id = TRAINED_TIMESTAMP
    trained_out = trained(x_apply)
    trained_weights = trained.get_weights()

    delta = trained - base
    rebuilt = base + delta
    halved = base * 0.5

    with open(os.path.join(out_dir, "model.dafne"), "wb") as f:
        base.dump(f)
    with open(os.path.join(out_dir, "delta.dafne"), "wb") as f:
        delta.dump(f)

    arrays = {
        "x_apply": x_apply,
        "x_train": x_train,
        "y_train": y_train,
        "base_out": base_out,
        "trained_out": trained_out,
        "rebuilt_out": rebuilt(x_apply),
    }
    for name, weights in (
        ("base_w", base_weights),
        ("trained_w", trained_weights),
        ("delta_w", delta.get_weights()),
        ("rebuilt_w", rebuilt.get_weights()),
        ("halved_w", halved.get_weights()),
    ):
        for i, w in enumerate(weights):
            arrays[f"{name}{i}"] = np.asarray(w)
    np.savez(os.path.join(out_dir, "results.npz"), **arrays)

    results = {
        "dafne_dl_version": dafne_dl.__version__,
        "model_id": MODEL_ID,
        "n_weights": len(base_weights),
        "base": {"timestamp_id": base.timestamp_id, "is_delta": bool(base.is_delta)},
        "trained": {"timestamp_id": trained.timestamp_id, "is_delta": bool(trained.is_delta)},
        "delta": {"timestamp_id": delta.timestamp_id, "is_delta": bool(delta.is_delta)},
        "rebuilt": {"timestamp_id": rebuilt.timestamp_id, "is_delta": bool(rebuilt.is_delta)},
        "loss_before": keras_digits.cross_entropy(base(x_train), y_train),
        "loss_after": keras_digits.cross_entropy(trained(x_train), y_train),
        "batch_size": keras_digits.BATCH_SIZE,
        "min_train_images": keras_digits.MIN_TRAIN_IMAGES,
        "torch_blob": write_torch_blob(os.path.join(out_dir, "torch.dafne")),
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
