"""The model-core demonstration: one model version's trip from coordinator to worker and back.

No broker is involved: the two sides run in this process, but exchange only bytes, exactly the
bytes that travel over RabbitMQ. The coordinator signs the model's code (once per model) and the
version's weights; the worker verifies both before compiling anything, learns on its local digits,
and returns a delta as a weight frame; the coordinator decodes the delta without any pickle,
checks it against the base version, and applies it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import codec, keyfiles, signing
from common.errors import SignatureError
from common.model.bundle import ModelCode, join_model, split_model


@dataclass
class Step:
    """One step of the demo, as shown in its table."""

    side: str
    what: str
    detail: str
    seconds: float


@dataclass
class CoreDemoResult:
    accuracy_before: float
    accuracy_after_local: float
    accuracy_after_apply: float
    tamper_error: str
    steps: list[Step] = field(default_factory=list)


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def run_core_demo(report: Callable[[Step], None] = lambda step: None, epochs: int = 3) -> CoreDemoResult:
    """Run the demo; ``report`` is called after each step (for live output)."""
    steps: list[Step] = []

    def step(side: str, what: str, detail: str, started: float) -> None:
        steps.append(Step(side, what, detail, time.perf_counter() - started))
        report(steps[-1])

    x_local, y_local, x_test, y_test = _digits()

    def accuracy(predict: Callable[[np.ndarray], np.ndarray]) -> float:
        return float((np.asarray(predict(x_test)).argmax(axis=1) == y_test).mean())

    with tempfile.TemporaryDirectory(prefix="fedmq-demo-") as tmp:
        # Coordinator: a model, version 1, and the key that signs its releases.
        t = time.perf_counter()
        from coordinator.demo.digits_model import make_model

        model = make_model()
        model.metadata["epochs"] = epochs
        code, weights = split_model(model)
        before = accuracy(model)
        step("coordinator", "build the digits model (v1)", f"test accuracy {before:.3f}", t)

        t = time.perf_counter()
        key_files = keyfiles.write_key_pair(Path(tmp))
        private = keyfiles.load_private_key(key_files.private_path)
        code_env = signing.seal(
            code.to_bytes(), key=private, kind=signing.KIND_MODEL_CODE, model_id=str(code.model_id), version=1
        )
        frame = codec.encode_weights(weights)
        release_env = signing.seal(
            frame, key=private, kind=signing.KIND_MODEL_RELEASE, model_id=str(code.model_id), version=1
        )
        step(
            "coordinator",
            "sign code and weights (Ed25519)",
            f"code {len(code_env):,} B, weights {len(release_env):,} B, "
            f"key {signing.key_id(private.public_key())}",
            t,
        )

        # Worker: verify both envelopes before compiling any code, then learn locally.
        t = time.perf_counter()
        trusted = keyfiles.load_public_key(key_files.public_path)
        tampered = bytearray(code_env)
        tampered[-10] ^= 0x01
        try:
            signing.open_envelope(bytes(tampered), trusted)
            tamper_error = "accepted (this must not happen)"
        except SignatureError as exc:
            tamper_error = f"{type(exc).__name__}: {exc}"
        step("worker", "refuse a tampered code envelope", tamper_error, t)

        t = time.perf_counter()
        _, code_payload = signing.open_envelope(code_env, trusted, expected_kind=signing.KIND_MODEL_CODE)
        header, weights_payload = signing.open_envelope(
            release_env, trusted, expected_kind=signing.KIND_MODEL_RELEASE
        )
        worker_model = join_model(ModelCode.from_bytes(code_payload), codec.decode_weights(weights_payload))
        base = worker_model.copy()
        step("worker", "verify, then load version 1", f"sha256 {header.sha256[:16]}… verified", t)

        t = time.perf_counter()
        worker_model.incremental_learn(x_local, y_local, 16, 5)
        after_local = accuracy(worker_model)
        delta = worker_model - base
        delta_frame = codec.encode_weights(delta.get_weights())
        step(
            "worker",
            f"learn on {len(x_local)} local digits, delta = trained - v1",
            f"local accuracy {after_local:.3f}; delta frame {len(delta_frame):,} B",
            t,
        )

        # Coordinator: decode the delta (msgpack + raw arrays, never pickle), check, apply.
        t = time.perf_counter()
        limits = codec.CodecLimits(
            max_total_bytes=2 * codec.weights_nbytes(weights) + 4096, max_arrays=len(weights)
        )
        delta_weights = codec.decode_weights(delta_frame, limits=limits)
        if [(d.shape, d.dtype) for d in delta_weights] != [(w.shape, w.dtype) for w in weights]:
            raise RuntimeError("the delta does not match version 1's shapes")
        if not all(np.isfinite(d).all() for d in delta_weights):
            raise RuntimeError("the delta holds non-finite values")
        version_2 = [w + d for w, d in zip(weights, delta_weights, strict=True)]
        applied = join_model(code, version_2)
        after_apply = accuracy(applied)
        norm = float(np.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta_weights)))
        step(
            "coordinator",
            "decode and check the delta, apply -> v2",
            f"‖delta‖₂ {norm:.3f}; test accuracy {after_apply:.3f}",
            t,
        )

    return CoreDemoResult(before, after_local, after_apply, tamper_error, steps)
