"""Delta validation: layout, finite values, the norm bound and the sample cap, each with its reason."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.validation import DeltaPolicy, DeltaRejectedError, validate_delta

BASE = [np.zeros((300, 7), np.float32), np.zeros(7, np.float64), np.zeros(2, np.int64)]


def delta(scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [(rng.normal(size=b.shape) * scale).astype(b.dtype) for b in BASE]


def test_the_norm_is_the_l2_norm_of_the_floating_point_arrays():
    d = delta()
    d[2][:] = 10**6  # counters take no part in the norm

    norm = validate_delta(d, BASE, 16)

    expected = np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in d[:2]))
    assert norm == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_is_rejected_naming_its_array(bad):
    d = delta()
    d[1][3] = bad

    with pytest.raises(DeltaRejectedError, match="array 1: holds NaN or infinite values"):
        validate_delta(d, BASE, 16)


def test_finite_values_whose_squares_overflow_are_rejected_as_such():
    d = delta()
    d[1][:] = 1e200

    with pytest.raises(DeltaRejectedError, match="overflows"):
        validate_delta(d, BASE, 16)


def test_layout_norm_bound_and_sample_cap_give_their_reasons():
    d = delta(scale=10.0)

    with pytest.raises(DeltaRejectedError, match=r"array 0: float64 \(300, 7\)"):
        validate_delta([d[0].astype(np.float64), d[1], d[2]], BASE, 16)
    with pytest.raises(DeltaRejectedError, match="2 arrays, the base version has 3"):
        validate_delta(d[:2], BASE, 16)
    with pytest.raises(DeltaRejectedError, match="exceeds the bound 1"):
        validate_delta(d, BASE, 16, DeltaPolicy(max_norm=1.0))
    with pytest.raises(DeltaRejectedError, match="exceeds the cap of 10"):
        validate_delta(d, BASE, 11, DeltaPolicy(max_sample_count=10))
    with pytest.raises(DeltaRejectedError, match="not positive"):
        validate_delta(d, BASE, 0)
