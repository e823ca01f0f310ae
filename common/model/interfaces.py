"""``DeepLearningClass``: dafne-dl's abstract model, with its operators.

``A - B`` is a delta, ``A + B`` applies a delta, ``A * f`` (or ``f * A``) scales the weights by a
number (Python or numpy scalar), ``model(data)`` applies the model. Metadata is a JSON-like dict.
"""

from __future__ import annotations

import io
import json
import numbers
import time
from abc import ABC, abstractmethod
from typing import IO, Any

from common.errors import IncompatibleModelError, WrongDimensionalityError

__all__ = ["DeepLearningClass", "IncompatibleModelError", "WrongDimensionalityError"]


def as_python_number(factor: Any) -> int | float:
    """Return ``factor`` as a Python int or float, refusing anything but a real number."""
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
        raise NotImplementedError(
            "Incompatible types for multiplication (only multiplication by numeric factor is allowed)"
        )
    return int(factor) if isinstance(factor, numbers.Integral) else float(factor)


class DeepLearningClass(ABC):
    """A model that can be applied, learn incrementally, and combine with deltas of itself."""

    type: str = "DeepLearningClass"
    data_dimensionality: int = 2
    timestamp_id: Any

    def __init__(self, metadata: dict[str, Any] | IO[str] | str | None = None) -> None:
        self.metadata: dict[str, Any] = {}
        if metadata is not None:
            self.set_metadata(metadata)

    # metadata --------------------------------------------------------------------------------
    def get_metadata(self) -> dict[str, Any]:
        """The metadata dict, completed (as dafne-dl does) with dimensionality, type and abilities."""
        self.metadata["dimensionality"] = str(self.get_data_dimensionality())
        self.metadata["type"] = getattr(self, "type", "DynamicDLModel")
        self.metadata["can_incremental_learn"] = self.can_incremental_learn()
        return self.metadata

    def set_metadata(self, metadata: dict[str, Any] | IO[str] | str) -> None:
        """Set metadata from a dict, an open JSON file, or the path of a JSON file."""
        if isinstance(metadata, io.IOBase):
            self.metadata = json.load(metadata)
        elif isinstance(metadata, str):
            with open(metadata) as f:
                self.metadata = json.load(f)
        else:
            self.metadata = dict(metadata)  # type: ignore[arg-type]

    def save_json_metadata(self, f: IO[str], pretty: bool = False) -> None:
        json.dump(self.get_metadata(), f, indent=4 if pretty else None)

    def reset_timestamp(self) -> None:
        self.timestamp_id = int(time.time())

    def get_data_dimensionality(self) -> int:
        return int(getattr(self, "data_dimensionality", 2))

    # the model contract ----------------------------------------------------------------------
    @abstractmethod
    def init_model(self) -> None: ...

    @abstractmethod
    def calc_delta(self, other: DeepLearningClass, threshold: float | None = None) -> DeepLearningClass:
        """Return ``self - other`` as a delta model whose timestamp is ``other``'s."""

    @abstractmethod
    def apply_delta(self, other: DeepLearningClass) -> DeepLearningClass:
        """Return a new model: ``self`` with the delta ``other`` applied."""

    @abstractmethod
    def incremental_learn(
        self, training_data: Any, training_outputs: Any, bs: int = 5, minTrainImages: int = 5
    ) -> None: ...

    @abstractmethod
    def apply(self, data: Any) -> Any: ...

    @abstractmethod
    def factor_multiply(self, factor: float) -> DeepLearningClass: ...

    @abstractmethod
    def can_incremental_learn(self) -> bool: ...

    # operators -------------------------------------------------------------------------------
    def __sub__(self, rhs: DeepLearningClass) -> DeepLearningClass:
        return self.calc_delta(rhs)

    def sum(self, other: DeepLearningClass) -> DeepLearningClass:
        """``self + other``; defaults to applying ``other`` as a delta."""
        return self.apply_delta(other)

    def __add__(self, rhs: DeepLearningClass) -> DeepLearningClass:
        return self.sum(rhs)

    def __mul__(self, factor: Any) -> DeepLearningClass:
        return self.factor_multiply(as_python_number(factor))

    def __rmul__(self, factor: Any) -> DeepLearningClass:
        return self.factor_multiply(as_python_number(factor))

    def __call__(self, data: Any) -> Any:
        return self.apply(data)
