"""Device choice: a worker running numpy models never imports TensorFlow; Keras models see its devices."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_numpy_model_trains_without_importing_tensorflow_and_gpu_memory_growth_is_preset():
    out = run(
        """
        import os, sys
        import numpy as np
        from worker.daemon import device_info, prepare_devices
        from worker.trainer import train
        from worker.data import LocalData
        from common.model.numpy_model import make_linear_model
        prepare_devices()
        rng = np.random.default_rng(0)
        train(make_linear_model(4, 3), LocalData(rng.random((20, 4)).astype("float32"), rng.integers(0, 3, 20), ()))
        print(device_info(), "tensorflow" in sys.modules, os.environ["TF_FORCE_GPU_ALLOW_GROWTH"])
        """
    )
    assert out.split() == ["{'device':", "'cpu'}", "False", "true"]


def test_once_model_code_imports_tensorflow_the_worker_reports_its_devices():
    out = run(
        """
        import tensorflow as tf
        from worker.daemon import device_info
        gpus = tf.config.list_physical_devices("GPU")
        info = device_info()
        assert info["device"] == ("gpu" if gpus else "cpu"), info
        print(info.get("framework", "tensorflow"))
        """
    )
    assert out.strip().endswith("tensorflow")
