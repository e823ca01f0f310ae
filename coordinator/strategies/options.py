"""Strategy option values: coercion with errors that name the option, and the wrapper options.

Options arrive from ``--option k=v`` as JSON-decoded values (numbers, booleans) or plain strings, and
from SQL as stored; every strategy turns them into typed values here so that ``"0.5"`` and ``0.5``
mean the same, and a bad value is a :class:`ConfigError` that names the option.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from common.errors import ConfigError


def as_float(
    owner: str,
    key: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float within [low, high] (bounds excluded when ``*_open``)."""
    if isinstance(value, bool):
        raise ConfigError(f"{owner}: option {key!r} must be a number, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}: option {key!r} must be a number, not {value!r}") from None
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if not math.isfinite(number) or too_low or too_high:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise ConfigError(
            f"{owner}: option {key!r} = {number!r} is out of range {lo or '(-inf'}, {hi or 'inf)'}"
        )
    return number


def as_int(owner: str, key: str, value: Any, *, low: int = 0) -> int:
    """``value`` as an integer >= ``low`` (``"3"`` and ``3.0`` are accepted, ``3.5`` is not)."""
    number = as_float(owner, key, value)
    if number != int(number) or number < low:
        raise ConfigError(f"{owner}: option {key!r} must be an integer >= {low}, not {value!r}")
    return int(number)


def as_choice(owner: str, key: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` as one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{owner}: option {key!r} must be one of {', '.join(choices)}, not {value!r}")
    return value


def as_optional_int(owner: str, key: str, value: Any, *, low: int = 0) -> int | None:
    if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
        return None
    return as_int(owner, key, value, low=low)


@dataclass(frozen=True)
class PrivacyOptions:
    """The wrapper options every strategy accepts.

    ``clip``: each delta is scaled by ``min(1, clip / ||delta||)`` (L2 over all float arrays) before
    it is combined. ``dp_noise``: noise multiplier z of DP-FedAvg with fixed clipping; Gaussian noise
    of standard deviation ``z * clip / n`` (n deltas) is added to the aggregated delta, and sample
    counts no longer weight the deltas. ``dp_seed``: makes the noise reproducible (tests, studies).
    """

    OPTION_NAMES: ClassVar[tuple[str, ...]] = ("clip", "dp_noise", "dp_seed")

    clip: float | None = None
    noise_multiplier: float = 0.0
    seed: int | None = None

    @classmethod
    def parse(cls, options: dict[str, Any]) -> PrivacyOptions:
        owner = "strategy wrapper"
        clip = options.get("clip")
        clip_value = None if clip is None else as_float(owner, "clip", clip, low=0.0, low_open=True)
        noise = as_float(owner, "dp_noise", options.get("dp_noise", 0.0), low=0.0)
        seed = as_optional_int(owner, "dp_seed", options.get("dp_seed"))
        if noise > 0 and clip_value is None:
            raise ConfigError("option 'dp_noise' needs 'clip': the noise is calibrated to the clipping norm")
        return cls(clip=clip_value, noise_multiplier=noise, seed=seed)

    def as_options(self) -> dict[str, Any]:
        """The options as stored with the lineage (only those set)."""
        out: dict[str, Any] = {}
        if self.clip is not None:
            out["clip"] = self.clip
        if self.noise_multiplier > 0:
            out["dp_noise"] = self.noise_multiplier
            if self.seed is not None:
                out["dp_seed"] = self.seed
        return out
