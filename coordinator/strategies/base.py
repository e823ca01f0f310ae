"""The strategy seam: ``Strategy.begin(base) -> Aggregation``; ``add`` each delta; ``finish``.

Deltas are streamed: an aggregation sees each accepted delta once, in any order, and may keep
whatever running state it needs (FedAvg keeps one running sum, so memory stays O(model) however
many deltas arrive). Integer arrays (counters, step numbers) are never averaged: the base version's
values are kept.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from common.errors import ConfigError

_STRATEGIES: dict[str, type[Strategy]] = {}


def is_averaged(array: np.ndarray) -> bool:
    """Whether a weight array takes part in aggregation (floating point) or keeps its base value."""
    return bool(np.issubdtype(array.dtype, np.floating))


class Aggregation(ABC):
    """One round's aggregation in progress."""

    @abstractmethod
    def add(self, delta: Sequence[np.ndarray], sample_count: int, staleness: int = 0) -> None:
        """Take one validated delta into account."""

    @abstractmethod
    def finish(self) -> list[np.ndarray]:
        """The next version's weights."""

    @property
    @abstractmethod
    def count(self) -> int:
        """How many deltas were added."""


class Strategy(ABC):
    """A named aggregation rule with options (stored with each version's lineage)."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _STRATEGIES[cls.name] = cls

    def __init__(self, **options: Any) -> None:
        self.options = dict(options)

    @abstractmethod
    def begin(self, base: Sequence[np.ndarray]) -> Aggregation:
        """Start aggregating deltas against ``base``."""

    def config(self) -> dict[str, Any]:
        """What is stored with the version's lineage."""
        return {"strategy": self.name, "options": self.options}


def strategy_names() -> list[str]:
    return sorted(_STRATEGIES)


def get_strategy(name: str, options: Mapping[str, Any] | None = None) -> Strategy:
    """The strategy called ``name``, configured with ``options``; ConfigError for unknown ones."""
    cls = _STRATEGIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown strategy {name!r}; choose one of: {', '.join(strategy_names())}")
    try:
        return cls(**dict(options or {}))
    except TypeError as exc:
        raise ConfigError(f"strategy {name!r}: {exc}") from exc
