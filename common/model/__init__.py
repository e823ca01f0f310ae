"""The model core: dafne-dl's ``DynamicDLModel`` format, compatible both ways with dafne-dl.

Importing this package imports numpy and dill, never TensorFlow.
"""

from __future__ import annotations

from common.errors import IncompatibleModelError, ModelCodeError, WrongDimensionalityError
from common.model import defaults
from common.model.dynamic import FUNCTION_NAMES, DynamicDLModel
from common.model.interfaces import DeepLearningClass

__all__ = [
    "FUNCTION_NAMES",
    "DeepLearningClass",
    "DynamicDLModel",
    "IncompatibleModelError",
    "ModelCodeError",
    "WrongDimensionalityError",
    "defaults",
]
