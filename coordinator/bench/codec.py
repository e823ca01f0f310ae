"""Benchmark of the weight codec against a plain memory copy measured in the same run.

Two copy baselines are measured over the same number of bytes as the weights:

- *copy*: ``bytes(memoryview)``, a copy into freshly allocated memory. This is the work
  :func:`~common.codec.encode_weights` must do (it returns a new ``bytes``), page faults included,
  so the targets are stated against it.
- *warm copy*: ``np.copyto`` into a buffer already touched, the memcpy ceiling. It is compared with
  :meth:`~common.codec.WeightFrame.write_into` a reused buffer, the codec's path for streaming.

Targets (DESIGN.md, "Performance targets"): encode+decode >= 0.5x copy, decode >= 10x copy.
Figures are the best of ``repeat`` runs. The benchmark never fails on a missed target.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.codec import decode_weights, encode_weights, layout_frame, weights_nbytes

logger = logging.getLogger(__name__)

ENCODE_DECODE_TARGET = 0.5
DECODE_TARGET = 10.0
_MB = 1_000_000
_CONV_WIDTHS = (64, 128, 256, 512, 512)
_DENSE_UNITS = 1000


@dataclass(frozen=True)
class CodecBenchResult:
    """Figures of one benchmark run; bandwidths in GB/s (10**9 bytes/s) of weight data."""

    size_mb: float
    arrays: int
    frame_bytes: int
    repeat: int
    copy_gbps: float
    warm_copy_gbps: float
    encode_gbps: float
    encode_into_gbps: float
    decode_gbps: float
    encode_decode_gbps: float
    encode_decode_ratio: float
    decode_ratio: float
    encode_into_ratio: float
    encode_decode_target: float
    decode_target: float
    encode_decode_target_met: bool
    decode_target_met: bool


def realistic_layer_shapes(target_bytes: int) -> list[tuple[tuple[int, ...], str]]:
    """Shapes and dtypes of a conv-net's weights summing to about ``target_bytes``.

    3x3 conv kernels (cin x cout) with biases and batch-norm vectors (gamma, beta, moving mean and
    variance) in widening stages, a dense head sized to fill the rest, and two int64 counters.
    """
    counters: list[tuple[tuple[int, ...], str]] = [((), "int64"), ((), "int64")]
    layers: list[tuple[tuple[int, ...], str]] = []
    total, cin, stage = 16, 3, 0
    while True:
        cout = _CONV_WIDTHS[min(stage, len(_CONV_WIDTHS) - 1)]
        block = [((3, 3, cin, cout), "float32"), ((cout,), "float32")] + [((cout,), "float32")] * 4
        block_bytes = 4 * (9 * cin * cout + 5 * cout)
        if total + block_bytes + 4 * (cout + 1) * _DENSE_UNITS > target_bytes:
            break
        layers += block
        total += block_bytes
        cin, stage = cout, stage + 1
    rows = max(1, (target_bytes - total) // (4 * _DENSE_UNITS) - 1)
    layers += [((rows, _DENSE_UNITS), "float32"), ((_DENSE_UNITS,), "float32")]
    return layers + counters


def make_weights(size_mb: float, seed: int = 0) -> list[np.ndarray]:
    """Random weights with :func:`realistic_layer_shapes` of about ``size_mb`` megabytes."""
    rng = np.random.default_rng(seed)
    weights: list[np.ndarray] = []
    for shape, dtype in realistic_layer_shapes(int(size_mb * _MB)):
        if dtype == "int64":
            weights.append(np.asarray(rng.integers(0, 10**6), dtype=np.int64).reshape(shape))
        else:
            weights.append(rng.standard_normal(shape, dtype=np.float32))
    return weights


def best_seconds(action: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls; results are dropped outside the timed region."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = action()
        elapsed = time.perf_counter() - start
        del result
        best = min(best, elapsed)
    return max(best, 1e-9)


def run_codec_benchmark(size_mb: float = 100, repeat: int = 5) -> CodecBenchResult:
    """Measure the copy baselines, encode, encode-into, decode and encode+decode of ~``size_mb`` MB."""
    if size_mb <= 0 or repeat < 1:
        raise ValueError("size_mb must be positive and repeat at least 1")
    weights = make_weights(size_mb)
    nbytes = weights_nbytes(weights)
    source = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
    source_view = source.data
    warm = np.empty_like(source)
    frame = encode_weights(weights)
    reused = bytearray(len(frame))
    logger.info(
        "codec benchmark: %d arrays, %d bytes of weights, frame %d bytes", len(weights), nbytes, len(frame)
    )

    copy_s = best_seconds(lambda: bytes(source_view), repeat)
    warm_copy_s = best_seconds(lambda: np.copyto(warm, source), repeat)
    encode_s = best_seconds(lambda: encode_weights(weights), repeat)
    encode_into_s = best_seconds(lambda: layout_frame(weights).write_into(reused), repeat)
    decode_s = best_seconds(lambda: decode_weights(frame), repeat)
    round_trip_s = best_seconds(lambda: decode_weights(encode_weights(weights)), repeat)

    def gbps(seconds: float) -> float:
        return nbytes / seconds / 1e9

    encode_decode_ratio = copy_s / round_trip_s
    decode_ratio = copy_s / decode_s
    return CodecBenchResult(
        size_mb=nbytes / _MB,
        arrays=len(weights),
        frame_bytes=len(frame),
        repeat=repeat,
        copy_gbps=gbps(copy_s),
        warm_copy_gbps=gbps(warm_copy_s),
        encode_gbps=gbps(encode_s),
        encode_into_gbps=gbps(encode_into_s),
        decode_gbps=gbps(decode_s),
        encode_decode_gbps=gbps(round_trip_s),
        encode_decode_ratio=encode_decode_ratio,
        decode_ratio=decode_ratio,
        encode_into_ratio=warm_copy_s / encode_into_s,
        encode_decode_target=ENCODE_DECODE_TARGET,
        decode_target=DECODE_TARGET,
        encode_decode_target_met=encode_decode_ratio >= ENCODE_DECODE_TARGET,
        decode_target_met=decode_ratio >= DECODE_TARGET,
    )
