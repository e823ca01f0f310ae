"""``DynamicDLModel``: a model made of self-contained functions plus weights (dafne-dl's format).

Same constructor, attributes and methods as dafne-dl 2.x. Functions may be given as callables or
as source text; either way each carries its source, which is what :meth:`dump` stores. Blobs are
dill pickles of a dict (see :mod:`common.model.blob`): loading one runs its code, so only load
blobs you trust — workers load releases only through :func:`common.signing.load_signed_model`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from io import BytesIO
from typing import IO, Any

from common.errors import ModelError
from common.model.interfaces import DeepLearningClass, as_python_number
from common.model.source import compile_function, fn_to_source

#: The model's function slots, in dafne-dl's order; each is stored as source text in a blob.
FUNCTION_NAMES: tuple[str, ...] = (
    "init_model_function",
    "apply_model_function",
    "weights_to_model_function",
    "model_to_weights_function",
    "calc_delta_function",
    "apply_delta_function",
    "weight_copy_function",
    "factor_multiply_function",
    "incremental_learn_function",
)

_REQUIRED = ("init_model_function", "apply_model_function")


def _keras_defaults() -> dict[str, Callable[..., Any]]:
    """dafne-dl's defaults for the weight slots left empty (they work for any get/set_weights model)."""
    from common.model import defaults

    return defaults.KERAS_DEFAULTS


class DynamicDLModel(DeepLearningClass):
    """A serializable model whose behaviour is given by functions (see module docstring).

    A weight slot left as ``None`` gets dafne-dl's Keras default (``model.get_weights()`` /
    ``model.set_weights()`` and element-wise arithmetic over the weight list).
    """

    init_model_function: Callable[..., Any]
    apply_model_function: Callable[..., Any]
    weights_to_model_function: Callable[..., Any]
    model_to_weights_function: Callable[..., Any]
    calc_delta_function: Callable[..., Any]
    apply_delta_function: Callable[..., Any]
    weight_copy_function: Callable[..., Any]
    factor_multiply_function: Callable[..., Any]
    incremental_learn_function: Callable[..., Any] | None

    def __init__(
        self,
        model_id: Any,
        init_model_function: Callable[..., Any] | str,
        apply_model_function: Callable[..., Any] | str,
        weights_to_model_function: Callable[..., Any] | str | None = None,
        model_to_weights_function: Callable[..., Any] | str | None = None,
        calc_delta_function: Callable[..., Any] | str | None = None,
        apply_delta_function: Callable[..., Any] | str | None = None,
        weight_copy_function: Callable[..., Any] | str | None = None,
        factor_multiply_function: Callable[..., Any] | str | None = None,
        incremental_learn_function: Callable[..., Any] | str | None = None,
        weights: Any = None,
        timestamp_id: Any = None,
        is_delta: bool = False,
        data_dimensionality: int = 2,
        metadata: dict[str, Any] | IO[str] | str | None = None,
        **kwargs: Any,
    ) -> None:
        DeepLearningClass.__init__(self, metadata)
        self.model: Any = None
        self.model_id = model_id
        self.is_delta = is_delta
        self.type = "DynamicDLModel"
        self.data_dimensionality = data_dimensionality
        self.function_mappings = list(FUNCTION_NAMES)
        given = locals()
        keras_defaults = _keras_defaults()
        for fn_name in FUNCTION_NAMES:
            fn = given[fn_name]
            self.set_internal_fn(fn_name, keras_defaults.get(fn_name) if fn is None else fn)
        self.init_model()
        if timestamp_id is None:
            self.reset_timestamp()
        else:
            self.timestamp_id = timestamp_id
        if weights is not None and len(weights) > 0:
            self.set_weights(weights)

    def set_internal_fn(self, internal_name: str, obj: Any) -> None:
        """Set a function slot from a callable or from source text (compiled in a model namespace)."""
        if isinstance(obj, str):
            obj = compile_function(obj, internal_name)
        elif obj is None:
            if internal_name in _REQUIRED:
                raise ModelError(f"{internal_name} is required")
        elif not callable(obj):
            raise ModelError(f"{internal_name} must be a function or its source, not {type(obj).__name__}")
        setattr(self, internal_name, obj)

    def function_sources(self) -> dict[str, str | None]:
        """Source text of every function slot (``None`` for an empty slot)."""
        return {name: fn_to_source(getattr(self, name)) for name in self.function_mappings}

    def can_incremental_learn(self) -> bool:
        return getattr(self, "incremental_learn_function", None) is not None

    def init_model(self) -> None:
        self.model = self.init_model_function()

    def set_weights(self, weights: Any) -> None:
        self.weights_to_model_function(self, weights)

    def get_weights(self) -> Any:
        return self.model_to_weights_function(self)

    def apply_delta(self, other: DeepLearningClass) -> DynamicDLModel:
        return self.apply_delta_function(self, other)

    def calc_delta(self, other: DeepLearningClass, threshold: float | None = None) -> DynamicDLModel:
        return self.calc_delta_function(self, other, threshold)

    def apply(self, data: Any) -> Any:
        return self.apply_model_function(self, data)

    def __sub__(self, rhs: DeepLearningClass) -> DynamicDLModel:
        return self.calc_delta(rhs)

    def __add__(self, rhs: DeepLearningClass) -> DynamicDLModel:
        return self.apply_delta(rhs)

    def __mul__(self, factor: Any) -> DynamicDLModel:
        return self.factor_multiply(as_python_number(factor))

    def __rmul__(self, factor: Any) -> DynamicDLModel:
        return self.factor_multiply(as_python_number(factor))

    def factor_multiply(self, factor: float) -> DynamicDLModel:
        return self.factor_multiply_function(self, factor)

    def incremental_learn(
        self,
        trainingData: Any,
        trainingOutputs: Any,
        bs: int = 5,
        minTrainImages: int = 5,
    ) -> None:
        if self.incremental_learn_function is None:
            raise ModelError(f"model {self.model_id!r} has no incremental_learn_function")
        self.incremental_learn_function(self, trainingData, trainingOutputs, bs, minTrainImages)

    # serialization ----------------------------------------------------------------------------
    def dump(self, file: IO[bytes], layout: str = "2") -> None:
        """Write a dafne blob: ``layout="2"`` (dafne-dl 2.x) or ``"1.4"`` (readable by 1.4, too)."""
        from common.model.blob import dump_blob

        dump_blob(self, file, layout=layout)

    def dumps(self, layout: str = "2") -> bytes:
        file = BytesIO()
        self.dump(file, layout=layout)
        return file.getvalue()

    @staticmethod
    def Load(file: IO[bytes]) -> DynamicDLModel:
        """Read a dafne blob from an open file. This runs the blob's code: trusted input only."""
        from common.model.blob import load_blob

        return load_blob(file.read())

    @staticmethod
    def Loads(b: bytes) -> DynamicDLModel:
        """Read a dafne blob from bytes. This runs the blob's code: trusted input only."""
        from common.model.blob import load_blob

        return load_blob(b)

    # copies -----------------------------------------------------------------------------------
    def get_empty_copy(self) -> DynamicDLModel:
        """A new model with the same functions, id, timestamp and metadata, freshly initialised."""
        new_model = DynamicDLModel(
            self.model_id,
            self.init_model_function,
            self.apply_model_function,
            weights=None,
            timestamp_id=self.timestamp_id,
            is_delta=self.is_delta,
            data_dimensionality=self.get_data_dimensionality(),
            metadata=copy.deepcopy(self.metadata),
        )
        for fn_name in self.function_mappings:
            new_model.set_internal_fn(fn_name, getattr(self, fn_name))
        return new_model

    def copy(self) -> DynamicDLModel:
        """A new model with the same functions and a copy of the weights."""
        model_out = self.get_empty_copy()
        model_out.set_weights(self.weight_copy_function(self.get_weights()))
        return model_out

    def __repr__(self) -> str:
        kind = "delta" if self.is_delta else "model"
        return f"<DynamicDLModel {kind} {self.model_id!r} timestamp={self.timestamp_id!r}>"
