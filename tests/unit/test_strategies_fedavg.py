"""FedAvg and delta validation against hand-computed expectations."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import ConfigError
from coordinator.strategies import get_strategy
from coordinator.validation import DeltaPolicy, DeltaRejectedError, validate_delta


def test_fedavg_is_the_sample_weighted_mean_added_to_the_base():
    base = [np.array([1.0, 2.0], dtype=np.float32), np.array([5], dtype=np.int64)]
    agg = get_strategy("fedavg").begin(base)

    agg.add([np.array([1.0, 0.0], dtype=np.float32), np.array([100], dtype=np.int64)], sample_count=30)
    agg.add([np.array([-1.0, 4.0], dtype=np.float32), np.array([100], dtype=np.int64)], sample_count=10)
    new = agg.finish()

    # (30*[1,0] + 10*[-1,4]) / 40 = [0.5, 1.0]
    np.testing.assert_allclose(new[0], [1.5, 3.0])
    assert new[0].dtype == np.float32
    assert new[1].tolist() == [5], "integer counters keep the base value"
    assert agg.count == 2


def test_fedavg_with_no_deltas_returns_the_base_and_server_lr_scales():
    base = [np.array([1.0, 1.0])]
    assert get_strategy("fedavg").begin(base).finish()[0].tolist() == [1.0, 1.0]
    agg = get_strategy("fedavg", {"server_lr": 0.5}).begin(base)
    agg.add([np.array([2.0, 2.0])], 1)
    assert agg.finish()[0].tolist() == [2.0, 2.0]


def test_unknown_strategy_or_bad_option_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown strategy 'nope'"):
        get_strategy("nope")
    with pytest.raises(ConfigError, match="fedavg"):
        get_strategy("fedavg", {"momentum": 0.9})


def test_validation_returns_the_norm_and_rejects_with_reasons():
    base = [np.zeros((2, 2), dtype=np.float32), np.zeros(3, dtype=np.int64)]
    good = [np.full((2, 2), 0.5, dtype=np.float32), np.zeros(3, dtype=np.int64)]

    assert validate_delta(good, base, 10) == pytest.approx(1.0)
    cases = [
        ([good[0]], 10, DeltaPolicy(), "1 arrays"),
        ([good[0].astype(np.float64), good[1]], 10, DeltaPolicy(), "array 0: float64"),
        ([np.full((2, 2), np.nan, dtype=np.float32), good[1]], 10, DeltaPolicy(), "NaN"),
        (good, 0, DeltaPolicy(), "not positive"),
        (good, 11, DeltaPolicy(max_sample_count=10), "exceeds the cap"),
        (good, 10, DeltaPolicy(max_norm=0.5), "L2 norm 1 exceeds"),
    ]
    for delta, count, policy, reason in cases:
        with pytest.raises(DeltaRejectedError, match=reason):
            validate_delta(delta, base, count, policy)


def test_fedavg_streams_large_arrays_with_float64_accuracy_when_asked():
    rng = np.random.default_rng(1)
    base = [rng.standard_normal((3, 100_001)).astype(np.float32), np.zeros(5, np.float32)]
    deltas = [[rng.standard_normal(b.shape).astype(np.float32) for b in base] for _ in range(5)]
    counts = [1, 7, 30, 2, 11]
    agg = get_strategy("fedavg", {"accumulate": "float64"}).begin(base)

    for delta, count in zip(deltas, counts, strict=True):
        agg.add(delta, count)
    new = agg.finish()

    for j, b in enumerate(base):
        mean = np.average(np.stack([d[j].astype(np.float64) for d in deltas]), axis=0, weights=counts)
        expected = (b.astype(np.float64) + mean).astype(np.float32)
        np.testing.assert_array_equal(new[j], expected)


@pytest.mark.parametrize("drift", [0.0, 0.01])
def test_fedavg_float32_sums_stay_within_2_sqrt_n_ulps_of_an_exact_mean_of_1000_deltas(drift):
    rng = np.random.default_rng(3)
    size, n = 20_000, 1000
    counts = rng.integers(1, 200, n)
    agg = get_strategy("fedavg").begin([np.zeros(size, np.float32)])
    exact, magnitude = np.zeros(size), np.zeros(size)

    for count in counts:
        delta = (drift + 0.01 * rng.standard_normal(size)).astype(np.float32)  # a common drift + noise
        agg.add([delta], int(count))
        exact += count * delta.astype(np.float64)
        magnitude += count * np.abs(delta.astype(np.float64))
    mean = agg.finish()[0]

    # each coordinate within 2 sqrt(n) float32 rounding units of the deltas' weighted mean magnitude
    # (typical error ~ sqrt(n/3) units with a common drift; the worst-case bound is n units)
    assert mean.dtype == np.float32
    tolerance = 2 * np.sqrt(n) * 2.0**-24 * magnitude / counts.sum()
    assert np.all(np.abs(mean - exact / counts.sum()) <= tolerance)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"])
def test_float32_and_float64_sums_agree_for_every_mean_based_strategy(name):
    rng = np.random.default_rng(4)
    base = [rng.standard_normal(5000).astype(np.float32), np.array([3], np.int64)]
    deltas = [
        [0.01 * rng.standard_normal(5000).astype(np.float32), np.array([9], np.int64)] for _ in range(9)
    ]
    results = {}

    for accumulate in ("float32", "float64"):
        agg = get_strategy(name, {"accumulate": accumulate, "clip": 0.5}).begin(base)
        for i, delta in enumerate(deltas):
            agg.add(delta, 10 + i)
        results[accumulate] = agg.finish()

    np.testing.assert_allclose(results["float32"][0], results["float64"][0], rtol=1e-6, atol=1e-7)
    assert results["float32"][0].dtype == np.float32
    assert results["float32"][1].tolist() == [3], "integer counters keep the base value"


def test_accumulate_accepts_only_float32_or_float64():
    with pytest.raises(ConfigError, match="'accumulate' must be one of float32, float64"):
        get_strategy("fedavg", {"accumulate": "float16"})
    assert get_strategy("fedadam").config()["options"]["accumulate"] == "float32"


def test_fedavg_holds_at_most_one_delta():
    import gc
    import weakref

    base = [np.zeros(1000, np.float32)]
    agg = get_strategy("fedavg").begin(base)
    deltas = [[np.full(1000, float(i), np.float32)] for i in range(5)]
    alive = [weakref.ref(d[0]) for d in deltas]

    for i in range(5):
        agg.add(deltas[i], 1)
        deltas[i] = None
    gc.collect()

    assert sum(ref() is not None for ref in alive) <= 1, "one running sum, not the deltas"
    assert agg.finish()[0].tolist() == [2.0] * 1000  # (0+1+2+3+4)/5


def test_fractional_weights_such_as_staleness_scaled_counts_are_accepted():
    agg = get_strategy("fedavg").begin([np.zeros(1)])

    agg.add([np.array([4.0])], 10 * 0.5)  # a stale delta the engine weighted by 0.5
    agg.add([np.array([1.0])], 15)

    # (5*4 + 15*1) / 20 = 1.75
    assert agg.finish()[0].tolist() == [1.75]
