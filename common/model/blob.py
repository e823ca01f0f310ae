"""Reading and writing dafne blobs: a dill pickle of a dict of model fields and function sources.

Layouts:

* ``"2"`` (dafne-dl 2.x): ``model_id, weights, timestamp_id, is_delta, data_dimensionality, type,
  metadata`` and one key per function (its source text).
* ``"1.4"``: the same without ``data_dimensionality``, ``type`` and ``metadata``, which dafne-dl 1.4
  passes to a constructor that does not accept them.

Reading accepts both, plus old blobs whose functions were pickled as code objects. It unpickles,
then compiles the function sources: both run code, so :func:`load_blob` is for trusted bytes only —
workers reach it through :func:`common.signing.load_signed_model`, after the signature verified.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import dill

from common.errors import BlobError, ModelCodeError, UnsupportedModelTypeError
from common.model.dynamic import FUNCTION_NAMES, DynamicDLModel
from common.model.source import compile_function

LAYOUTS = ("2", "1.4")
SUPPORTED_TYPES = ("DynamicDLModel",)
_FIELDS_2X = ("data_dimensionality", "type", "metadata")


def blob_dict(model: DynamicDLModel, layout: str = "2") -> dict[str, Any]:
    """The dict a dafne blob of ``model`` holds, in the given layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dafne blob layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    output: dict[str, Any] = {
        "model_id": model.model_id,
        "weights": model.get_weights(),
        "timestamp_id": model.timestamp_id,
        "is_delta": model.is_delta,
    }
    if layout == "2":
        output["data_dimensionality"] = model.get_data_dimensionality()
        output["type"] = model.type
        output["metadata"] = model.metadata
    output.update(model.function_sources())
    return output


def dump_blob(model: DynamicDLModel, file: IO[bytes], layout: str = "2") -> None:
    """Write ``model`` as a dafne blob to ``file``."""
    dill.dump(blob_dict(model, layout), file)


class _Placeholder:
    """Stands in for a class whose module is not installed, so a blob's ``type`` can still be read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _TypeProbe(dill.Unpickler):
    """An unpickler that replaces classes and functions of missing modules with placeholders."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except ImportError:
            return _Placeholder


def _probe_type(data: bytes) -> Any:
    """The ``type`` field of a blob whose unpickling needs modules that are not installed."""
    try:
        probed = _TypeProbe(io.BytesIO(data)).load()
    except Exception:  # anything: this is only a second chance to name the model type
        return None
    return probed.get("type") if isinstance(probed, dict) else None


def read_blob_dict(data: bytes) -> dict[str, Any]:
    """Unpickle a blob's dict (this runs pickle: trusted bytes only) and check its shape."""
    try:
        loaded = dill.loads(data)
    except ImportError as exc:
        model_type = _probe_type(data)
        if model_type is not None and model_type not in SUPPORTED_TYPES:
            raise UnsupportedModelTypeError(str(model_type)) from exc
        raise BlobError(f"the blob needs the Python module {exc.name!r}, which is not installed") from exc
    except (
        pickle.UnpicklingError,
        EOFError,
        AttributeError,
        IndexError,
        TypeError,
        ValueError,
        KeyError,
        MemoryError,
    ) as exc:
        raise BlobError(f"not a readable dafne model blob: {type(exc).__name__}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise BlobError(f"not a dafne model blob: it holds a {type(loaded).__name__}, not a dict")
    model_type = loaded.get("type", "DynamicDLModel")
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelTypeError(str(model_type))
    missing = [
        key for key in ("model_id", "init_model_function", "apply_model_function") if key not in loaded
    ]
    if missing:
        raise BlobError(f"not a dafne model blob: missing {', '.join(missing)}")
    return loaded


def model_from_blob_dict(fields: dict[str, Any]) -> DynamicDLModel:
    """Build a model from a blob's dict, compiling each function from its source."""
    kwargs = dict(fields)
    kwargs.pop("type", None)
    for key, value in fields.items():
        if key.endswith("_function") and isinstance(value, str):
            kwargs[key] = compile_function(value, key)
        elif key.endswith("_function") and value is not None and not callable(value):
            raise ModelCodeError(key, f"holds a {type(value).__name__}, not source text or a function")
    unknown = [k for k in kwargs if k.endswith("_function") and k not in FUNCTION_NAMES]
    for key in unknown:
        kwargs.pop(key)
    try:
        return DynamicDLModel(**kwargs)
    except (ModelCodeError, BlobError, UnsupportedModelTypeError):
        raise
    except TypeError as exc:
        raise BlobError(f"the blob's fields do not build a DynamicDLModel: {exc}") from exc


def load_blob(data: bytes) -> DynamicDLModel:
    """Load a dafne blob (either layout). Runs the blob's code: trusted bytes only."""
    return model_from_blob_dict(read_blob_dict(data))
