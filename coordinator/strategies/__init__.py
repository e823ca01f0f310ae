"""Aggregation strategies: pure numpy over weight lists, selected by name.

A strategy turns a base version's weights and the accepted deltas of a round into the next
version's weights. :class:`Strategy` is the seam the coordinator calls; strategies register here by
name so ``fedmq rounds start --strategy NAME --option k=v`` finds them. docs/strategies.md lists
them with their options and formulas.

Modules: ``base`` (the seam, the registry), ``options`` (option values, the clip/DP wrapper options),
``combiners`` (the streaming weighted mean), ``robust`` (blockwise median, trimmed mean, Krum,
Bulyan), ``server`` (plain step, momentum, Adam/Yogi/Adagrad), ``privacy`` (clipping, Gaussian
noise), ``pipeline`` (the aggregation composing them), and the named strategies in ``fedavg``,
``adaptive`` and ``byzantine``.
"""

from __future__ import annotations

from coordinator.strategies.adaptive import FedAdagrad, FedAdam, FedYogi
from coordinator.strategies.base import (
    Aggregation,
    Strategy,
    get_strategy,
    strategy_names,
    strategy_option_names,
)
from coordinator.strategies.byzantine import (
    BulyanStrategy,
    KrumStrategy,
    MedianStrategy,
    MultiKrumStrategy,
    TrimmedMeanStrategy,
)
from coordinator.strategies.combiners import is_averaged
from coordinator.strategies.fedavg import FedAvg, FedAvgM, FedProx

__all__ = [
    "Aggregation",
    "BulyanStrategy",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "KrumStrategy",
    "MedianStrategy",
    "MultiKrumStrategy",
    "Strategy",
    "TrimmedMeanStrategy",
    "get_strategy",
    "is_averaged",
    "strategy_names",
    "strategy_option_names",
]
