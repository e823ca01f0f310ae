"""Default model functions, written to run unchanged in fedmq and in dafne-dl.

Every function here is self-contained (imports inside its body) and is recompiled from its own
source by :func:`~common.model.source.model_function`, so the code fedmq runs is the code a blob
carries. The arithmetic functions (delta, add, multiply, copy) work on any model whose
``get_weights()`` returns a list of numpy arrays; only the two weight-transfer functions differ
between Keras models (``model.get_weights()``) and plain numpy models (``model`` *is* the list).

Deltas keep the dtype of integer arrays and compute them exactly; :func:`default_keras_delta_function`
refuses models with different ids, array counts or shapes with ``IncompatibleModelError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from common.model.source import model_function

if TYPE_CHECKING:
    from common.model.dynamic import DynamicDLModel


@model_function
def default_keras_weights_to_model_function(modelObj: DynamicDLModel, weights):
    modelObj.model.set_weights(weights)


@model_function
def default_keras_model_to_weights_function(modelObj: DynamicDLModel):
    return modelObj.model.get_weights()


@model_function
def default_keras_delta_function(lhs: DynamicDLModel, rhs: DynamicDLModel, threshold=None):
    import numpy as np
    from dafne_dl.interfaces import IncompatibleModelError

    if lhs.model_id != rhs.model_id:
        raise IncompatibleModelError(f"model ids differ: {lhs.model_id!r} and {rhs.model_id!r}")
    lhs_weights = lhs.get_weights()
    rhs_weights = rhs.get_weights()
    if len(lhs_weights) != len(rhs_weights):
        raise IncompatibleModelError(f"{len(lhs_weights)} arrays against {len(rhs_weights)}")
    new_weights = []
    for depth, (left, right) in enumerate(zip(lhs_weights, rhs_weights)):
        if np.shape(left) != np.shape(right):
            raise IncompatibleModelError(f"array {depth}: shape {np.shape(left)} against {np.shape(right)}")
        delta = np.subtract(left, right)
        if threshold is not None:
            delta[np.abs(delta) < threshold] = 0
        new_weights.append(delta)
    output = lhs.get_empty_copy()
    output.set_weights(new_weights)
    output.is_delta = True
    output.timestamp_id = rhs.timestamp_id  # the delta names the version it applies to
    return output


@model_function
def default_keras_add_weights_function(lhs: DynamicDLModel, rhs: DynamicDLModel):
    import numpy as np
    from dafne_dl.interfaces import IncompatibleModelError

    if lhs.model_id != rhs.model_id:
        raise IncompatibleModelError(f"model ids differ: {lhs.model_id!r} and {rhs.model_id!r}")
    lhs_weights = lhs.get_weights()
    rhs_weights = rhs.get_weights()
    if len(lhs_weights) != len(rhs_weights):
        raise IncompatibleModelError(f"{len(lhs_weights)} arrays against {len(rhs_weights)}")
    new_weights = []
    for depth, (left, right) in enumerate(zip(lhs_weights, rhs_weights)):
        if np.shape(left) != np.shape(right):
            raise IncompatibleModelError(f"array {depth}: shape {np.shape(left)} against {np.shape(right)}")
        new_weights.append(np.add(left, right).astype(np.asarray(left).dtype, copy=False))
    output = lhs.get_empty_copy()
    output.set_weights(new_weights)
    return output


@model_function
def default_keras_multiply_function(lhs: DynamicDLModel, rhs: float):
    import numbers

    import numpy as np

    if isinstance(rhs, bool) or not isinstance(rhs, numbers.Real):
        raise NotImplementedError(
            "Incompatible types for multiplication (only multiplication by numeric factor is allowed)"
        )
    new_weights = []
    for layer in lhs.get_weights():
        layer = np.asarray(layer)
        product = layer * rhs
        if np.issubdtype(layer.dtype, np.floating):
            product = product.astype(layer.dtype, copy=False)
        new_weights.append(product)
    output = lhs.get_empty_copy()
    output.set_weights(new_weights)
    return output


@model_function
def default_keras_weight_copy_function(weights_in):
    import numpy as np

    return [np.array(layer, copy=True) for layer in weights_in]


@model_function
def numpy_weights_to_model_function(modelObj, weights):
    """For models whose ``model`` is the list of numpy arrays itself: store writable copies."""
    import numpy as np

    modelObj.model = [np.array(w, copy=True) for w in weights]


@model_function
def numpy_model_to_weights_function(modelObj):
    return list(modelObj.model)


KERAS_DEFAULTS: dict[str, Callable[..., Any]] = {
    "weights_to_model_function": default_keras_weights_to_model_function,
    "model_to_weights_function": default_keras_model_to_weights_function,
    "calc_delta_function": default_keras_delta_function,
    "apply_delta_function": default_keras_add_weights_function,
    "weight_copy_function": default_keras_weight_copy_function,
    "factor_multiply_function": default_keras_multiply_function,
}

#: The defaults for plain numpy models: dafne's arithmetic, numpy weight transfer.
NUMPY_DEFAULTS: dict[str, Callable[..., Any]] = {
    **KERAS_DEFAULTS,
    "weights_to_model_function": numpy_weights_to_model_function,
    "model_to_weights_function": numpy_model_to_weights_function,
}
