"""FedBuff's staleness weight, and which strategies it reaches (docs/rounds.md, "Asynchronous runs").

The engine passes ``sample_count * staleness_weight(s)`` to the strategy: the sample-weighted means
feel it; the robust rules and any strategy under ``dp_noise`` weigh every delta the same.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.rounds import staleness_weight
from coordinator.strategies import get_strategy


def test_staleness_weight_is_one_over_the_square_root_of_one_plus_the_staleness() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(1) == pytest.approx(1 / math.sqrt(2))
    assert staleness_weight(3) == pytest.approx(0.5)
    assert staleness_weight(8) == pytest.approx(1 / 3)
    assert [round(staleness_weight(s), 2) for s in (2, 10)] == [0.58, 0.30]  # the docstring's figures


def aggregate(name: str, options: dict[str, object], counts: list[float]) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    base = [np.zeros((3, 4), np.float32), np.zeros(4, np.float32)]
    agg = get_strategy(name, options).begin(base)
    for count in counts:
        agg.add([rng.normal(size=b.shape).astype(np.float32) for b in base], count)
    return agg.finish()


FRESH = [10.0] * 7
STALE = [10.0 * staleness_weight(s) for s in (0, 5, 1, 9, 0, 2, 3)]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("median", {}),
        ("trimmed-mean", {"beta": 0.2}),
        ("krum", {"f": 1}),
        ("multi-krum", {"f": 1}),
        ("bulyan", {"f": 1}),
        ("fedavg", {"clip": 10.0, "dp_noise": 0.1, "dp_seed": 3}),
    ],
)
def test_robust_strategies_and_dp_noise_ignore_staleness_weights(
    name: str, options: dict[str, object]
) -> None:
    fresh, stale = aggregate(name, options, FRESH), aggregate(name, options, STALE)

    for a, b in zip(fresh, stale, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fedavg_weighs_stale_deltas_less() -> None:
    fresh, stale = aggregate("fedavg", {}, FRESH), aggregate("fedavg", {}, STALE)

    assert not np.allclose(fresh[0], stale[0])
