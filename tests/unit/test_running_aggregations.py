"""Running aggregations: taken only when they hold exactly the round's deltas from the same state."""

from __future__ import annotations

import numpy as np

from coordinator.running import CommittedDelta, RunningAggregations
from coordinator.strategies import get_strategy

BASE = [np.zeros(4, np.float32)]


def starter(strategy: str, state_blob_id: int | None = None):
    started: list[int] = []

    def start(round_id: int):
        started.append(round_id)
        aggregation = get_strategy(strategy).begin(BASE)
        return (aggregation, state_blob_id) if aggregation.streaming else None

    return start, started


def delta(round_id: int, delta_id: int, value: float, weight: float = 1.0) -> CommittedDelta:
    return CommittedDelta(round_id, delta_id, [np.full(4, value, np.float32)], weight, 0)


def test_a_round_fed_every_delta_once_is_taken_with_their_weighted_mean():
    running, (start, started) = RunningAggregations(), starter("fedavg")

    running.feed([delta(7, 1, 1.0, weight=1), delta(7, 2, 4.0, weight=3)], start)
    running.feed([delta(7, 2, 4.0, weight=3)], start)  # a duplicate feed counts once
    aggregation = running.take(7, {1, 2}, None)

    assert started == [7] and aggregation is not None
    np.testing.assert_allclose(aggregation.finish()[0], np.full(4, 3.25))
    assert running.take(7, {1, 2}, None) is None  # taken once


def test_a_round_missing_a_delta_or_with_another_server_state_is_not_taken():
    running, (start, _) = RunningAggregations(), starter("fedavg", state_blob_id=5)
    running.feed([delta(1, 1, 1.0), delta(2, 2, 1.0)], start)

    assert running.take(1, {1, 3}, 5) is None  # delta 3 was accepted elsewhere
    assert running.take(2, {2}, 6) is None  # the server state changed


def test_robust_rules_are_not_run_ahead():
    running, (start, started) = RunningAggregations(), starter("median")

    running.feed([delta(1, 1, 1.0), delta(1, 2, 2.0)], start)

    assert started == [1] and running.take(1, {1, 2}, None) is None


def test_at_most_max_rounds_are_kept():
    running, (start, _) = RunningAggregations(max_rounds=2), starter("fedavg")

    running.feed([delta(1, 1, 1.0), delta(2, 2, 1.0), delta(3, 3, 1.0)], start)

    assert running.take(1, {1}, None) is None
    assert running.take(3, {3}, None) is not None


def test_a_round_taken_while_its_last_delta_is_being_fed_waits_for_that_feed():
    import threading

    running, (start, _) = RunningAggregations(), starter("fedavg")
    running.feed([delta(1, 1, 1.0)], start)
    committed = threading.Event()
    taken: list[object] = []

    def consumer() -> None:  # the results thread: commit announced, then fed a little later
        with running.feeding():
            committed.set()
            threading.Event().wait(0.3)
            running.feed([delta(1, 2, 3.0)], start)

    thread = threading.Thread(target=consumer)
    thread.start()
    committed.wait()
    taken.append(running.take(1, {1, 2}, None))  # the ticker, right after the commit
    thread.join()

    assert taken[0] is not None


def test_a_round_that_ends_without_aggregation_is_forgotten():
    running, (start, _) = RunningAggregations(), starter("fedavg")
    running.feed([delta(1, 1, 1.0), delta(2, 2, 1.0)], start)

    running.discard([1])

    assert running.take(1, {1}, None) is None and running.take(2, {2}, None) is not None
