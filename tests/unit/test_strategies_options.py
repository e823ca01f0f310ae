"""Options of every strategy, the clip / DP wrapper options, counters, and FedProx's client side."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import ConfigError
from common.model.numpy_model import make_linear_model
from coordinator.strategies import get_strategy, strategy_names, strategy_option_names
from worker.data import LocalData
from worker.trainer import proximal_pull, train

ALL = strategy_names()


def test_every_strategy_of_the_issue_is_registered():
    expected = {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "median"}
    expected |= {"trimmed-mean", "krum", "multi-krum", "bulyan"}

    assert expected <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_counters_keep_the_base_value_and_float_dtypes_are_kept(name):
    base = [np.zeros((2, 2), np.float32), np.array([5, 6], np.int64), np.zeros(3, np.float64)]
    agg = get_strategy(name, {"clip": 100.0}).begin(base)

    for i in range(7):
        agg.add([np.full((2, 2), 0.1 * i, np.float32), np.array([100, 100], np.int64), np.ones(3)], 10)
    new = agg.finish()

    assert new[1].tolist() == [5, 6] and new[1].dtype == np.int64
    assert [a.dtype for a in new] == [np.float32, np.int64, np.float64]
    assert not np.array_equal(new[2], base[2]), f"{name} moved the float arrays"


@pytest.mark.parametrize("name", ALL)
def test_an_unknown_option_is_a_config_error_naming_it(name):
    with pytest.raises(ConfigError, match=f"strategy '{name}': unknown option 'bogus_option'"):
        get_strategy(name, {"bogus_option": 1})


@pytest.mark.parametrize(
    ("name", "options", "named"),
    [
        ("fedavg", {"server_lr": 0}, "server_lr"),
        ("fedavgm", {"momentum": 1.0}, "momentum"),
        ("fedadam", {"tau": "none"}, "tau"),
        ("fedyogi", {"beta2": -0.1}, "beta2"),
        ("trimmed-mean", {"beta": 0.5}, "beta"),
        ("krum", {"f": 1.5}, "'f'"),
        ("multi-krum", {"m": 0}, "'m'"),
        ("fedprox", {"mu": -1}, "'mu'"),
        ("median", {"clip": 0}, "clip"),
        ("median", {"dp_noise": 1.0}, "needs 'clip'"),
        ("fedavg", {"clip": 1, "dp_noise": True}, "dp_noise"),
    ],
)
def test_a_bad_option_value_is_a_config_error_naming_it(name, options, named):
    with pytest.raises(ConfigError, match=named):
        get_strategy(name, options)


def test_options_typed_on_the_command_line_are_coerced_and_stored_with_defaults():
    strategy = get_strategy(
        "multi-krum", {"f": "2", "m": "3", "clip": "1.5", "dp_noise": "0.5", "dp_seed": "7"}
    )

    assert strategy.config() == {
        "strategy": "multi-krum",
        "options": {"f": 2, "m": 3, "server_lr": 1.0, "clip": 1.5, "dp_noise": 0.5, "dp_seed": 7},
    }
    assert get_strategy(strategy.name, strategy.config()["options"]).config() == strategy.config()
    assert strategy_option_names("trimmed-mean") == ["beta", "server_lr", "clip", "dp_noise", "dp_seed"]


def test_clipping_scales_each_delta_to_the_norm_bound():
    base = [np.zeros(2, np.float32), np.zeros(1, np.int64)]
    big = [np.array([3.0, 4.0], np.float32), np.array([10**9], np.int64)]  # norm 5 (counters excluded)
    small = [np.array([0.3, 0.4], np.float32), np.array([0], np.int64)]  # norm 0.5, kept as is

    agg = get_strategy("fedavg", {"clip": 1.0}).begin(base)
    agg.add(big, 1)
    agg.add(small, 1)
    new = agg.finish()

    # big becomes [0.6, 0.8]; mean with [0.3, 0.4] -> [0.45, 0.6]
    np.testing.assert_allclose(new[0], [0.45, 0.6], rtol=1e-6)


def test_clipping_composes_with_median():
    base = [np.zeros(2, np.float32)]
    deltas = [[np.array(v, np.float32)] for v in ([30.0, 40.0], [0.0, 0.5], [0.6, 0.0])]

    agg = get_strategy("median", {"clip": 1.0}).begin(base)
    for delta in deltas:
        agg.add(delta, 1)
    new = agg.finish()

    # clipped: [0.6, 0.8], [0, 0.5], [0.6, 0]; medians per coordinate: 0.6 and 0.5
    np.testing.assert_allclose(new[0], [0.6, 0.5], rtol=1e-6)


def test_dp_noise_has_the_calibrated_spread_and_ignores_sample_counts():
    size, n = 200_000, 4
    base = [np.zeros(size, np.float32)]
    options = {"clip": 1000.0, "dp_noise": 0.002, "dp_seed": 11}  # norms 45..179: nothing clipped

    agg = get_strategy("fedavg", options).begin(base)
    for i in range(n):
        agg.add([np.full(size, 0.1 * (i + 1), np.float32)], sample_count=1 + 1000 * i)
    new = agg.finish()[0].astype(np.float64)

    # std = z * clip / n = 0.002 * 1000 / 4 = 0.5; equal weights: mean delta (1+2+3+4)/4 * 0.1 = 0.25
    # (weighted by the sample counts it would be (0.1*1 + 0.2*1001 + 0.3*2001 + 0.4*3001)/6004 = 0.333)
    assert new.std() == pytest.approx(0.5, rel=0.01)
    assert new.mean() == pytest.approx(0.25, abs=0.01)


def test_dp_noise_is_reproducible_with_a_seed_and_differs_between_rounds():
    def run(base, options):
        agg = get_strategy("trimmed-mean", options).begin(base)
        agg.add([np.zeros(1000, np.float32)], 1)
        agg.add([np.ones(1000, np.float32) * 0.01], 1)
        return agg.finish()[0]

    seeded = {"clip": 1.0, "dp_noise": 1.0, "dp_seed": 3}
    base, other_base = [np.zeros(1000, np.float32)], [np.full(1000, 0.5, np.float32)]

    assert np.array_equal(run(base, seeded), run(base, seeded))
    assert not np.allclose(run(base, seeded), run(other_base, seeded) - 0.5, atol=1e-3)
    assert not np.array_equal(
        run(base, {"clip": 1.0, "dp_noise": 1.0}), run(base, {"clip": 1.0, "dp_noise": 1.0})
    )


def test_fedprox_sends_its_proximal_coefficient_to_the_workers():
    assert get_strategy("fedprox", {"mu": "0.1"}).client_options() == {"proximal_mu": 0.1}
    assert get_strategy("fedavg").client_options() == {}


def test_proximal_pull_moves_each_float_array_towards_the_base():
    anchor = [np.array([1.0, 1.0], np.float32), np.array([3], np.int64)]
    weights = [np.array([3.0, -1.0], np.float32), np.array([4], np.int64)]

    pulled = proximal_pull(weights, anchor, mu=1.0)

    # 1 + (3 - 1)/2 = 2 and 1 + (-1 - 1)/2 = 0; the counter is left as trained
    assert pulled[0].tolist() == [2.0, 0.0] and pulled[0].dtype == np.float32
    assert pulled[1].tolist() == [4]


def test_training_with_proximal_mu_halves_one_epoch_drift_when_mu_is_one():
    rng = np.random.default_rng(0)
    data = LocalData(rng.random((40, 4)).astype(np.float32), rng.integers(0, 3, 40), ())
    model = make_linear_model(4, 3)

    plain = train(model.copy(), data, {"epochs": 1, "batch_size": 8})
    prox = train(model.copy(), data, {"epochs": 1, "batch_size": 8, "proximal_mu": 1.0})
    held = train(model.copy(), data, {"epochs": 3, "batch_size": 8, "proximal_mu": 1e6})

    for p, q in zip(plain.delta, prox.delta, strict=True):
        np.testing.assert_allclose(q, p / 2, rtol=1e-5, atol=1e-7)
    assert max(float(np.abs(d).max()) for d in held.delta) < 1e-5
    assert prox.metrics["proximal_mu"] == 1.0
