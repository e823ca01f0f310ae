"""Aggregation strategies: pure numpy over weight lists, selected by name.

A strategy turns a base version's weights and the accepted deltas of a round into the next
version's weights. :class:`Strategy` is the seam the coordinator calls; strategies register here by
name so ``fedmq rounds start --strategy NAME`` finds them.
"""

from __future__ import annotations

from coordinator.strategies.base import Aggregation, Strategy, get_strategy, strategy_names
from coordinator.strategies.fedavg import FedAvg

__all__ = ["Aggregation", "FedAvg", "Strategy", "get_strategy", "strategy_names"]
