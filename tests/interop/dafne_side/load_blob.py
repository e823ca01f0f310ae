"""Run inside the dafne-dl environment: load a blob written by fedmq and use it the way dafne does.

Usage: python load_blob.py BLOB INPUTS_NPZ OUT_DIR

INPUTS_NPZ holds ``x_apply``, ``x_train``, ``y_train``, ``batch_size``, ``min_train_images``.
Loads BLOB with ``dafne_dl.DynamicDLModel.Loads``, applies it, learns incrementally on a copy,
computes ``trained - loaded`` and ``loaded + delta`` with the blob's own functions, and writes
``OUT_DIR/results.npz`` (outputs and weights) and ``OUT_DIR/results.json`` (ids, timestamps, flags,
losses, the blob's keys, the dafne-dl version).
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dafne_dl
import dill
import keras_digits
from dafne_dl import DynamicDLModel

TRAINED_TIMESTAMP = 1_700_000_999


def main(blob_path, inputs_path, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(blob_path, "rb") as f:
        blob = f.read()
    inputs = np.load(inputs_path)
    x_apply, x_train, y_train = inputs["x_apply"], inputs["x_train"], inputs["y_train"]

    model = DynamicDLModel.Loads(blob)
    functions_compiled = {
        name: callable(getattr(model, name)) for name in model.function_mappings if getattr(model, name)
    }
    loaded_out = model(x_apply)
    loaded_weights = model.get_weights()

    trained = model.copy()
    trained.incremental_learn(x_train, y_train, int(inputs["batch_size"]), int(inputs["min_train_images"]))
    trained.timestamp_id = TRAINED_TIMESTAMP
    delta = trained - model
    rebuilt = model + delta

    arrays = {"loaded_out": loaded_out, "trained_out": trained(x_apply)}
    for name, weights in (
        ("loaded_w", loaded_weights),
        ("trained_w", trained.get_weights()),
        ("delta_w", delta.get_weights()),
        ("rebuilt_w", rebuilt.get_weights()),
    ):
        for i, w in enumerate(weights):
            arrays[f"{name}{i}"] = np.asarray(w)
    np.savez(os.path.join(out_dir, "results.npz"), **arrays)

    results = {
        "dafne_dl_version": dafne_dl.__version__,
        "blob_keys": sorted(dill.loads(blob).keys()),
        "functions_compiled": functions_compiled,
        "model_id": model.model_id,
        "n_weights": len(loaded_weights),
        "loaded": {"timestamp_id": model.timestamp_id, "is_delta": bool(model.is_delta)},
        "trained": {"timestamp_id": trained.timestamp_id, "is_delta": bool(trained.is_delta)},
        "delta": {"timestamp_id": delta.timestamp_id, "is_delta": bool(delta.is_delta)},
        "rebuilt": {"timestamp_id": rebuilt.timestamp_id, "is_delta": bool(rebuilt.is_delta)},
        "loss_before": keras_digits.cross_entropy(model(x_train), y_train),
        "loss_after": keras_digits.cross_entropy(trained(x_train), y_train),
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:4])
