"""Server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad): hand-computed steps and their state."""

from __future__ import annotations

import numpy as np
import pytest

from common.codec import decode_weights, encode_weights
from common.errors import ConfigError
from coordinator.strategies import get_strategy


def _round(name, options, base, deltas, state=None, samples=1):
    """One round: every delta with ``samples``; returns (new weights, server state)."""
    agg = get_strategy(name, options).begin(base, state)
    for delta in deltas:
        agg.add(delta, samples)
    return agg.finish(), agg.server_state()


def test_fedavgm_carries_momentum_from_round_to_round():
    base = [np.array([0.0], dtype=np.float32)]

    first, state = _round("fedavgm", {"momentum": 0.5}, base, [[np.array([1.0])], [np.array([3.0])]])
    second, _ = _round("fedavgm", {"momentum": 0.5}, first, [[np.array([1.0])]], state)

    # round 1: mean 2, m = 0.5*0 + 2 = 2, new = 0 + 2 = 2
    # round 2: mean 1, m = 0.5*2 + 1 = 2, new = 2 + 2 = 4 (FedAvg would give 3)
    assert first[0].tolist() == [2.0]
    assert second[0].tolist() == [4.0]
    assert second[0].dtype == np.float32


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # eta=1, beta1=0.5, beta2=0.5, tau=1: m0=0, v0=tau^2=1; per coordinate, delta 3 and -1:
        # m = 0.5*0 + 0.5*delta = (1.5, -0.5)
        # Adam: v = 0.5*1 + 0.5*delta^2 = (5, 1);        new = m/(sqrt(v)+1) = (1.5/3.2360680, -0.25)
        ("fedadam", [1.5 / (np.sqrt(5.0) + 1), -0.25]),
        # Yogi: v = 1 - 0.5*delta^2*sign(1 - delta^2) = (1 + 4.5, 1 - 0) = (5.5, 1)
        ("fedyogi", [1.5 / (np.sqrt(5.5) + 1), -0.25]),
        # Adagrad (beta1 given 0.5 too): v = 1 + delta^2 = (10, 2)
        ("fedadagrad", [1.5 / (np.sqrt(10.0) + 1), -0.5 / (np.sqrt(2.0) + 1)]),
    ],
)
def test_adaptive_first_step_matches_the_paper_formulas(name, expected):
    options = {"eta": 1.0, "beta1": 0.5, "tau": 1.0}
    if name != "fedadagrad":
        options["beta2"] = 0.5
    base = [np.zeros(2, dtype=np.float32), np.array([7], dtype=np.int64)]
    delta = [np.array([3.0, -1.0], dtype=np.float32), np.array([1], dtype=np.int64)]

    new, state = _round(name, options, base, [delta])

    np.testing.assert_allclose(new[0], expected, rtol=1e-6)
    assert new[1].tolist() == [7]
    assert state is not None and len(state) == 4, "m and v for each of the two arrays"


def test_yogi_and_adam_differ_when_the_variance_shrinks():
    options = {"eta": 1.0, "beta1": 0.0, "beta2": 0.5, "tau": 1.0}
    base = [np.zeros(1, dtype=np.float64)]
    _, adam_state = _round("fedadam", options, base, [[np.array([3.0])]])
    _, yogi_state = _round("fedyogi", options, base, [[np.array([3.0])]])

    adam, _ = _round("fedadam", options, base, [[np.array([1.0])]], adam_state)
    yogi, _ = _round("fedyogi", options, base, [[np.array([1.0])]], yogi_state)

    # v after round 1: Adam 5, Yogi 5.5. Round 2 with delta 1:
    # Adam v = 0.5*5 + 0.5*1 = 3;  Yogi v = 5.5 - 0.5*1*sign(5.5 - 1) = 5
    np.testing.assert_allclose(adam[0], [1 / (np.sqrt(3.0) + 1)])
    np.testing.assert_allclose(yogi[0], [1 / (np.sqrt(5.0) + 1)])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_state_stored_and_read_back_continues_exactly_like_an_uninterrupted_run(name):
    rng = np.random.default_rng(4)
    start = [rng.standard_normal((3, 4)).astype(np.float32), np.array([1], dtype=np.int64)]
    rounds = [
        [[rng.standard_normal((3, 4)).astype(np.float32), np.array([9], dtype=np.int64)] for _ in range(3)]
        for _ in range(4)
    ]

    uninterrupted_strategy = get_strategy(name)
    weights, state = start, None
    for deltas in rounds:
        agg = uninterrupted_strategy.begin(weights, state)
        for delta in deltas:
            agg.add(delta, 5)
        weights, state = agg.finish(), agg.server_state()

    restarted, restarted_state = start, None
    for deltas in rounds:  # a new strategy object each round; state through the codec (read-only arrays)
        stored = None if restarted_state is None else decode_weights(encode_weights(restarted_state))
        restarted, restarted_state = _round(name, {}, restarted, deltas, stored, samples=5)

    forgetful = start
    for deltas in rounds:  # the state dropped every round: a restart that would lose the optimizer
        forgetful, _ = _round(name, {}, forgetful, deltas, samples=5)

    for a, b in zip(weights, restarted, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(forgetful[0], weights[0]), "the state must make a difference"
    assert not np.array_equal(weights[0], start[0])
    assert restarted[1].tolist() == [1], "the counter keeps its base value"


def test_a_round_without_deltas_keeps_the_base_and_the_state():
    base = [np.ones(2, dtype=np.float32)]
    _, state = _round("fedadam", {}, base, [[np.ones(2, dtype=np.float32)]])

    new, kept = _round("fedadam", {}, base, [], state)

    assert new[0].tolist() == [1.0, 1.0]
    assert kept is not None and all(np.array_equal(a, b) for a, b in zip(kept, state, strict=True))


def test_a_state_that_does_not_fit_the_model_is_a_config_error():
    _, state = _round("fedadam", {}, [np.zeros(3)], [[np.ones(3)]])

    with pytest.raises(ConfigError, match="server state array 0"):
        get_strategy("fedadam").begin([np.zeros(4)], state)
    with pytest.raises(ConfigError, match="server state has 2 arrays"):
        get_strategy("fedadam").begin([np.zeros(3), np.zeros(3)], state)


def test_stateless_strategies_have_no_server_state():
    agg = get_strategy("fedavg").begin([np.zeros(2)])
    agg.add([np.ones(2)], 1)
    agg.finish()

    assert agg.server_state() is None
