"""Robust strategies: hand-computed results, blockwise == whole, and Byzantine tolerance (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.strategies import get_strategy
from coordinator.strategies.robust import Bulyan, Median, MultiKrum, TrimmedMean


def _aggregate(name, options, base, deltas, samples=None):
    agg = get_strategy(name, options).begin(base)
    for i, delta in enumerate(deltas):
        agg.add(delta, 1 if samples is None else samples[i])
    return agg.finish()


def _scalars(*values):
    """One delta per value: a float32 array of one coordinate and an int64 counter."""
    return [[np.array([v], dtype=np.float32), np.array([99], dtype=np.int64)] for v in values]


BASE = [np.array([10.0], dtype=np.float32), np.array([3], dtype=np.int64)]


def test_median_and_trimmed_mean_per_coordinate():
    base = [np.zeros(2, dtype=np.float32)]
    deltas = [[np.array(v, dtype=np.float32)] for v in ([1, -5], [2, 0], [3, 5], [7, 10], [1000, -1000])]

    median = _aggregate("median", {}, base, deltas)
    trimmed = _aggregate("trimmed-mean", {"beta": 0.2}, base, deltas)

    # coordinate 0 sorted: 1 2 3 7 1000 -> median 3; trim floor(0.2*5)=1 each end -> (2+3+7)/3 = 4
    # coordinate 1 sorted: -1000 -5 0 5 10 -> median 0; trimmed (-5+0+5)/3 = 0
    assert median[0].tolist() == [3.0, 0.0]
    assert trimmed[0].tolist() == [4.0, 0.0]


def test_median_of_an_even_count_and_sample_counts_are_ignored():
    new = _aggregate("median", {}, BASE, _scalars(1, 2, 3, 100), samples=[1, 1, 1, 1000])

    # middle values 2 and 3 -> 2.5, added to the base 10; the counter keeps its base value
    assert new[0].tolist() == [12.5]
    assert new[1].tolist() == [3]


def test_krum_and_multi_krum_choose_by_the_scores():
    deltas = _scalars(0, 1, 2, 4, 100)

    krum = _aggregate("krum", {"f": 1}, BASE, deltas)
    multi3 = _aggregate("multi-krum", {"f": 1, "m": 3}, BASE, deltas)
    multi = _aggregate("multi-krum", {"f": 1}, BASE, deltas)

    # n=5, f=1: each score sums the squared distances to the n-f-2 = 2 nearest others:
    #   0: 1+4=5   1: 1+1=2   2: 1+4=5   4: 4+9=13   100: 96^2+98^2=18820
    # krum -> delta 1; m=3 -> {0,1,2}, mean 1; default m=n-f=4 -> {0,1,2,4}, mean 7/4
    assert krum[0].tolist() == [11.0]
    assert multi3[0].tolist() == [11.0]
    assert multi[0].tolist() == [11.75]
    assert krum[1].tolist() == [3]


def test_bulyan_selects_by_krum_then_averages_around_the_median():
    deltas = _scalars(0, 1, 2, 3, 4, 5, 1000)

    new = _aggregate("bulyan", {"f": 1}, BASE, deltas)

    # n=7, f=1: theta = n-2f = 5 chosen by repeated Krum: 2, 3, 1, 4, 0 (5 and 1000 left out);
    # per coordinate the theta-2f = 3 values closest to the median 2 are 1, 2, 3 -> mean 2
    assert new[0].tolist() == [12.0]


@pytest.mark.parametrize(
    "make",
    [
        lambda base, block: Median(base, block),
        lambda base, block: TrimmedMean(base, 0.25, block),
        lambda base, block: MultiKrum(base, 1, 2, block),
        lambda base, block: Bulyan(base, 1, block),
    ],
)
def test_block_by_block_equals_all_at_once(make):
    rng = np.random.default_rng(0)
    base = [np.zeros((4, 5), np.float32), np.zeros(7, np.float32), np.zeros(2, np.int64)]
    deltas = [[rng.standard_normal(b.shape).astype(b.dtype) for b in base] for _ in range(7)]
    tiny, whole = make(base, 8 * 7 * 3), make(base, 2**30)  # 3 coordinates per block, or everything

    for i, delta in enumerate(deltas):
        tiny.add(delta, 1.0, scale=0.5 + 0.1 * i)
        whole.add(delta, 1.0, scale=0.5 + 0.1 * i)
    small, large = tiny.result().arrays, whole.result().arrays

    for a, b in zip(small, large, strict=True):
        if a is None:
            assert b is None
        else:
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert small[2] is None, "integer arrays are not aggregated"


def test_robust_strategies_hold_the_given_arrays_without_copying_them():
    base = [np.zeros(4, np.float32)]
    deltas = [[np.full(4, float(i), np.float32)] for i in range(3)]
    for delta in deltas:
        delta[0].setflags(write=False)  # the engine's arrays are read-only views over SQL buffers
    combiner = Median(base)

    for delta in deltas:
        combiner.add(delta, 1.0)

    assert all(held[0] is given[0] for held, given in zip(combiner.deltas, deltas, strict=True))
    assert combiner.result().arrays[0].tolist() == [1.0] * 4


# n honest deltas around a centre (each coordinate within +-1 of it) and f Byzantine ones: either
# honest deltas scaled by 1e6 or large finite garbage; n + f satisfies each rule's requirement.
ROBUST = {
    "median": lambda n, f: ({}, 2 * f < n + f),
    "trimmed-mean": lambda n, f: ({"beta": f / (n + f) + 1e-9}, 2 * f < n + f),
    "krum": lambda n, f: ({"f": f}, n + f >= 2 * f + 3),
    "multi-krum": lambda n, f: ({"f": f}, n + f >= 2 * f + 3),
    "bulyan": lambda n, f: ({"f": f}, n + f >= 4 * f + 3),
}


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(3, 12),
    f=st.integers(1, 3),
    size=st.integers(1, 30),
    attack=st.sampled_from(["scaled", "garbage"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_robust_rules_stay_near_the_honest_mean_where_fedavg_does_not(n, f, size, attack, seed):
    rng = np.random.default_rng(seed)
    centre = rng.uniform(1.5, 3.0, size)
    honest = [centre + rng.uniform(-1.0, 1.0, size) for _ in range(n)]
    if attack == "scaled":
        byzantine = [honest[i % n] * 1e6 for i in range(f)]
    else:
        byzantine = [rng.choice([-1.0, 1.0], size) * rng.uniform(1e5, 1e9, size) for _ in range(f)]
    deltas = [[d.astype(np.float32)] for d in honest + byzantine]
    order = rng.permutation(len(deltas))
    deltas = [deltas[i] for i in order]
    base = [np.zeros(size, np.float32)]
    low, high = np.min(honest, axis=0), np.max(honest, axis=0)
    honest_mean = np.mean(honest, axis=0)

    fedavg = _aggregate("fedavg", {}, base, deltas)[0]

    assert np.max(np.abs(fedavg - honest_mean)) > 1e3
    for name, rule in ROBUST.items():
        options, applicable = rule(n, f)
        if not applicable:
            continue
        new = _aggregate(name, options, base, deltas)[0]
        # within the honest values' range coordinate by coordinate, so within 2 of the honest mean
        assert np.all(new >= low - 1e-5) and np.all(new <= high + 1e-5), name
        assert np.max(np.abs(new - honest_mean)) <= 2.0 + 1e-5, name
