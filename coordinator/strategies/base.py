"""The strategy seam: ``Strategy.begin(base, server_state) -> Aggregation``; ``add`` each delta; ``finish``.

Deltas are streamed: an aggregation sees each accepted delta once, in any order. The round engine
calls exactly::

    strategy = get_strategy(run.strategy, run.strategy_options)
    agg = strategy.begin(base_weights, server_state)   # server_state: last round's, or None
    for delta, sample_count in accepted: agg.add(delta, sample_count)
    new_weights = agg.finish()
    state = agg.server_state()        # persist; pass back to begin() next round (None: nothing to keep)
    worker_options = {**train_options, **strategy.client_options()}

A strategy is a *combiner* (how the deltas become one aggregated delta: weighted mean, median,
Krum, ...) followed by a *server update* (how the aggregated delta moves the base: plain step,
momentum, Adam, ...), with two wrapper options every strategy accepts: ``clip`` (each delta's L2
norm clipped to ``clip``) and ``dp_noise`` (Gaussian noise on the aggregated delta, DP-FedAvg).
Integer arrays (counters, step numbers) are never aggregated: the base version's values are kept.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from common.errors import ConfigError
from coordinator.strategies.combiners import Combiner
from coordinator.strategies.options import PrivacyOptions
from coordinator.strategies.server import PlainStep, ServerUpdate

_STRATEGIES: dict[str, type[Strategy]] = {}


class Aggregation(ABC):
    """One round's aggregation in progress."""

    @abstractmethod
    def add(self, delta: Sequence[np.ndarray], sample_count: float, staleness: int = 0) -> None:
        """Take one validated delta into account (the arrays are only read, never written).

        ``sample_count`` weights the delta in the mean-based strategies; any positive number works,
        so the engine may scale it by a staleness weight. ``staleness`` itself is not used here.
        """

    @abstractmethod
    def finish(self) -> list[np.ndarray]:
        """The next version's weights (new arrays, in the base version's dtypes)."""

    @property
    @abstractmethod
    def count(self) -> int:
        """How many deltas were added."""

    def server_state(self) -> list[np.ndarray] | None:
        """The server optimizer's state after :meth:`finish`, to pass to the next ``begin``; None if none."""
        return None

    @property
    def streaming(self) -> bool:
        """True when no delta is kept after :meth:`add` (running sums): then adding each delta as
        soon as it is committed costs no memory (see :mod:`coordinator.running`)."""
        return False


class Strategy(ABC):
    """A named aggregation rule with options (stored with each version's lineage).

    Subclasses set ``name``, take their own options as keyword arguments (each validated into
    ``self.options``), and override :meth:`combiner` and, for server optimizers,
    :meth:`server_update`. The wrapper options ``clip``/``dp_noise``/``dp_seed`` are handled here.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _STRATEGIES[cls.name] = cls

    def __init__(self, **options: Any) -> None:
        self.options = dict(options)
        self.privacy = PrivacyOptions()

    @abstractmethod
    def combiner(self, base: Sequence[np.ndarray]) -> Combiner:
        """A fresh combiner for one round."""

    def server_update(self) -> ServerUpdate:
        """How the aggregated delta moves the base (default: ``base + delta``)."""
        return PlainStep(1.0)

    def begin(
        self, base: Sequence[np.ndarray], server_state: Sequence[np.ndarray] | None = None
    ) -> Aggregation:
        """Start aggregating deltas against ``base``, continuing the optimizer from ``server_state``."""
        from coordinator.strategies.pipeline import PipelineAggregation

        update = self.server_update()
        state = update.check_state(base, server_state)
        return PipelineAggregation(base, self.combiner(base), update, state, self.privacy)

    def client_options(self) -> dict[str, Any]:
        """Options merged into every worker's training options (FedProx's ``proximal_mu``)."""
        return {}

    def config(self) -> dict[str, Any]:
        """What is stored with the version's lineage: the name and every option, defaults included."""
        return {"strategy": self.name, "options": {**self.options, **self.privacy.as_options()}}


def strategy_names() -> list[str]:
    return sorted(_STRATEGIES)


def strategy_option_names(name: str) -> list[str]:
    """The options strategy ``name`` accepts, its own then the wrapper options."""
    return _own_option_names(_strategy_class(name)) + list(PrivacyOptions.OPTION_NAMES)


def get_strategy(name: str, options: Mapping[str, Any] | None = None) -> Strategy:
    """The strategy called ``name``, configured with ``options``; ConfigError for unknown ones.

    Option values may be strings (as typed after ``--option k=v``), numbers or booleans.
    """
    cls = _strategy_class(name)
    own = dict(options or {})
    wrapper = {k: own.pop(k) for k in PrivacyOptions.OPTION_NAMES if k in own}
    allowed = _own_option_names(cls)
    for key in own:
        if key not in allowed:
            accepted = ", ".join(allowed + list(PrivacyOptions.OPTION_NAMES))
            raise ConfigError(f"strategy {name!r}: unknown option {key!r} (accepted: {accepted})")
    strategy = cls(**own)
    strategy.privacy = PrivacyOptions.parse(wrapper)
    return strategy


def _strategy_class(name: str) -> type[Strategy]:
    cls = _STRATEGIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown strategy {name!r}; choose one of: {', '.join(strategy_names())}")
    return cls


def _own_option_names(cls: type[Strategy]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind is inspect.Parameter.KEYWORD_ONLY]
