"""Rounds aggregated as their deltas are committed, so closing a round reads no delta back from SQL.

SQL stays the source of truth. A streaming aggregation (the FedAvg family: it keeps running sums,
never a delta) is fed each accepted delta right after the transaction that recorded it committed,
while its arrays are still in memory. When the round closes, the engine takes that aggregation only
if it holds exactly the round's accepted deltas (by row id) and began from the same server
state; otherwise — after a restart, when another coordinator accepted some of them, when a feed was
missed — it aggregates from SQL as before. Either way every accepted delta counts once.

Thread-safe: deltas are fed by the results consumer while the ticker thread may close the same
round. The consumer announces a feed (:meth:`RunningAggregations.feeding`) inside the transaction
that commits the deltas, before the commit, and :meth:`~RunningAggregations.take` waits (briefly)
for announced feeds, so a round closed right after its last delta committed still finds it fed.
A taken aggregation is never fed again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from coordinator.strategies.base import Aggregation

logger = logging.getLogger(__name__)

_MAX_ROUNDS = 8  # open rounds kept at once (each holds one model-sized sum)


@dataclass
class _Running:
    aggregation: Aggregation
    server_state_blob_id: int | None
    delta_ids: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class CommittedDelta:
    """An accepted delta whose transaction committed, with what its round's aggregation needs."""

    round_id: int
    delta_id: int
    arrays: Sequence[np.ndarray]
    weight: float  # sample count, times the staleness weight in async runs
    staleness: int


# Starts a round's aggregation: (aggregation, server_state_blob_id), or None when its strategy
# does not stream (robust rules hold every delta: they aggregate from SQL when the round closes).
Starter = Callable[[int], tuple[Aggregation, int | None] | None]


class RunningAggregations:
    """The running aggregation of each open round (see the module docstring)."""

    def __init__(self, max_rounds: int = _MAX_ROUNDS, feed_wait_s: float = 10.0) -> None:
        self.max_rounds = max_rounds
        self.feed_wait_s = feed_wait_s
        self._rounds: OrderedDict[int, _Running | None] = OrderedDict()
        self._lock = threading.Condition()
        self._feeds = 0

    @contextlib.contextmanager
    def feeding(self) -> Iterator[None]:
        """Announce a feed from before its deltas' commit until they were fed (or failed)."""
        with self._lock:
            self._feeds += 1
        try:
            yield
        finally:
            with self._lock:
                self._feeds -= 1
                self._lock.notify_all()

    def feed(self, deltas: Sequence[CommittedDelta], start: Starter) -> None:
        """Add committed deltas to their rounds' aggregations, starting them with ``start``."""
        with self._lock:
            for delta in deltas:
                if delta.round_id not in self._rounds:
                    started = start(delta.round_id)
                    self._rounds[delta.round_id] = _Running(*started) if started is not None else None
                    while len(self._rounds) > self.max_rounds:
                        self._rounds.popitem(last=False)
                running = self._rounds[delta.round_id]
                if running is None or delta.delta_id in running.delta_ids:
                    continue
                running.aggregation.add(delta.arrays, delta.weight, staleness=delta.staleness)
                running.delta_ids.add(delta.delta_id)

    def discard(self, round_ids: Iterable[int]) -> None:
        """Forget rounds that end without being aggregated (failed, cancelled)."""
        with self._lock:
            for round_id in round_ids:
                self._rounds.pop(round_id, None)

    def take(
        self, round_id: int, delta_ids: set[int], server_state_blob_id: int | None
    ) -> Aggregation | None:
        """The round's aggregation if it holds exactly ``delta_ids`` from that server state, else None.

        Whatever the answer, the round's entry is gone: a round is closed once.
        """
        with self._lock:
            if not self._lock.wait_for(lambda: self._feeds == 0, timeout=self.feed_wait_s):
                logger.warning("round %d: a delta feed did not finish; aggregating from SQL", round_id)
            running = self._rounds.pop(round_id, None)
        if running is None:
            return None
        if running.delta_ids != delta_ids or running.server_state_blob_id != server_state_blob_id:
            logger.info(
                "round %d: the running aggregation holds %d of %d deltas; aggregating from SQL",
                round_id,
                len(running.delta_ids & delta_ids),
                len(delta_ids),
            )
            return None
        return running.aggregation
