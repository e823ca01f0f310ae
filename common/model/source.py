"""Model functions as source text: the heart of dafne-dl's "self-contained code" model format.

A dafne model stores each of its functions as source text. Loading compiles that text in a fresh
namespace holding only what model code needs (``np``, ``numpy``, the model classes and dafne-dl's
error names), so a function must import everything else inside its body. Two consequences:

* Real dafne-dl blobs import from ``dafne_dl`` inside their bodies (``from dafne_dl.interfaces import
  IncompatibleModelError``). Model code sees an ``__import__`` that resolves ``dafne_dl`` (and the old
  name ``dl``) to fedmq's own compatible classes, so those blobs run where dafne-dl is not installed.
  A ``dafne_dl`` submodule fedmq does not provide falls back to a real dafne-dl when one is installed.
* The functions fedmq ships (:func:`model_function`) are compiled the same way at import, so what
  runs here is exactly what a dafne-dl installation runs from an exported blob.

This is aliasing, not a sandbox: model code is trusted code. Workers only compile it after the
coordinator's signature has verified (see :mod:`common.signing`).
"""

from __future__ import annotations
import __future__

import builtins
import hashlib
import inspect
import linecache
import re
import textwrap
import types
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from common.errors import ModelCodeError

F = TypeVar("F", bound=Callable[..., Any])

#: Textual patches dafne-dl applies to old blobs before compiling them (kept for the same blobs).
LEGACY_PATCHES: Mapping[str, str] = {
    re.escape(
        "def make_up_layer(input_layer, down_layer, filters, kernel_size, strides, padding, "
        "n_conv_layers=2):\n        level_up = Conv2DTranspose(filters=filters, kernel_size=kernel_size, "
        "strides=strides, output_padding=(padding, padding), kernel_regularizer=regularizers.l2(reg))"
        "(input_layer)"
    ): "def make_up_layer(input_layer, down_layer, filters, kernel_size, strides, padding, n_conv_layers=2):\n"
    "        if padding <= 0:\n            output_padding = None\n        else:\n"
    "            output_padding = (padding, padding)\n"
    "        level_up = Conv2DTranspose(filters=filters, kernel_size=kernel_size, strides=strides, "
    "output_padding=output_padding, kernel_regularizer=regularizers.l2(reg))(input_layer)",
}

_ALIASED_ROOTS = ("dafne_dl", "dl")
_compat_modules: dict[str, types.ModuleType] = {}


def _compat_tree() -> dict[str, types.ModuleType]:
    """Build (once) module objects that stand in for ``dafne_dl`` and its main submodules."""
    if _compat_modules:
        return _compat_modules
    from common import errors
    from common.model import dynamic, interfaces

    interfaces_mod = types.ModuleType("dafne_dl.interfaces")
    for name in ("DeepLearningClass", "IncompatibleModelError", "WrongDimensionalityError"):
        setattr(interfaces_mod, name, getattr(interfaces, name))
    misc_mod = types.ModuleType("dafne_dl.misc")
    misc_mod.fn_to_source = fn_to_source  # type: ignore[attr-defined]
    misc_mod.source_to_fn = source_to_fn  # type: ignore[attr-defined]
    dynamic_mod = types.ModuleType("dafne_dl.DynamicDLModel")
    dynamic_mod.DynamicDLModel = dynamic.DynamicDLModel  # type: ignore[attr-defined]
    dynamic_mod.IncompatibleModelError = errors.IncompatibleModelError  # type: ignore[attr-defined]
    root = types.ModuleType("dafne_dl")
    root.interfaces = interfaces_mod  # type: ignore[attr-defined]
    root.misc = misc_mod  # type: ignore[attr-defined]
    root.DynamicDLModel = dynamic.DynamicDLModel  # type: ignore[attr-defined]
    _compat_modules.update(
        {
            "dafne_dl": root,
            "dafne_dl.interfaces": interfaces_mod,
            "dafne_dl.misc": misc_mod,
            "dafne_dl.DynamicDLModel": dynamic_mod,
        }
    )
    return _compat_modules


def _model_import(
    name: str,
    globals: Mapping[str, Any] | None = None,
    locals: Mapping[str, Any] | None = None,
    fromlist: tuple[str, ...] | list[str] | None = (),
    level: int = 0,
) -> types.ModuleType:
    """``__import__`` as model code sees it: ``dafne_dl``/``dl`` resolve to fedmq's classes."""
    root, _, rest = name.partition(".")
    if level == 0 and root in _ALIASED_ROOTS:
        target = "dafne_dl" + ("." + rest if rest else "")
        tree = _compat_tree()
        if target in tree:
            return tree[target] if fromlist else tree["dafne_dl"]
        try:
            return builtins.__import__(target, globals, locals, fromlist or (), level)
        except ImportError as exc:
            raise ImportError(
                f"model code imports {name!r}; fedmq provides dafne_dl, dafne_dl.interfaces, "
                f"dafne_dl.misc and dafne_dl.DynamicDLModel, and dafne-dl is not installed for the rest"
            ) from exc
    return builtins.__import__(name, globals, locals, fromlist or (), level)


_MODEL_BUILTINS = dict(vars(builtins))
_MODEL_BUILTINS["__import__"] = _model_import


def model_namespace(function_name: str) -> dict[str, Any]:
    """A fresh global namespace for compiling one model function."""
    from common.model import dynamic, interfaces

    return {
        "__builtins__": _MODEL_BUILTINS,
        "__name__": f"fedmq_model_code.{function_name}",
        "np": np,
        "numpy": np,
        "DynamicDLModel": dynamic.DynamicDLModel,
        "DeepLearningClass": interfaces.DeepLearningClass,
        "IncompatibleModelError": interfaces.IncompatibleModelError,
    }


def compile_function(source: str, function_name: str, patches: Mapping[str, str] | None = None) -> Any:
    """Compile ``source`` in a model namespace and return the first function it defines.

    ``function_name`` names the model slot (e.g. ``apply_model_function``) for error messages.
    Annotations are not evaluated (PEP 563), so a source naming classes in annotations compiles.
    The returned function carries its text as ``.source`` (as dafne-dl's functions do) and its lines
    are registered with :mod:`linecache`, so tracebacks show model code.
    """
    if not isinstance(source, str):
        raise ModelCodeError(function_name, f"expected source text, got {type(source).__name__}")
    for search, replace in (LEGACY_PATCHES if patches is None else patches).items():
        source = re.sub(search, replace, source)
    text = textwrap.dedent(source)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    filename = f"<fedmq-model {function_name} {digest}>"
    namespace = model_namespace(function_name)
    before = set(namespace)
    try:
        code = compile(text, filename, "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)
        exec(code, namespace)  # model code is trusted here: see the module docstring
    except SyntaxError as exc:
        raise ModelCodeError(function_name, f"does not compile: {exc.msg} (line {exc.lineno})") from exc
    except Exception as exc:
        raise ModelCodeError(function_name, f"fails when defined: {type(exc).__name__}: {exc}") from exc
    for key, value in namespace.items():
        if key in before:
            continue
        if isinstance(value, types.FunctionType) and value.__code__.co_filename == filename:
            linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
            value.source = source  # type: ignore[attr-defined]
            return value
    raise ModelCodeError(function_name, "the source defines no function")


def _strip_own_decorator(text: str) -> str:
    lines = text.splitlines(keepends=True)
    while lines and lines[0].lstrip().startswith("@model_function"):
        lines.pop(0)
    return "".join(lines)


def fn_to_source(function: Any) -> str | None:
    """Return a model function's source text (``None`` for ``None``).

    Prefers the ``.source`` a compiled model function carries, then :func:`inspect.getsource`.
    Unlike dafne-dl, a function without retrievable source is an error rather than silently
    pickled bytecode: fedmq stores, signs and diffs model code as text.
    """
    if function is None:
        return None
    if isinstance(function, str):
        return function
    src = getattr(function, "source", None)
    if isinstance(src, str):
        return src
    name = getattr(function, "__name__", repr(function))
    try:
        return textwrap.dedent(_strip_own_decorator(inspect.getsource(function)))
    except (OSError, TypeError) as exc:
        raise ModelCodeError(
            name, "its source text cannot be found; define model functions in a .py file"
        ) from exc


def source_to_fn(source: Any, patches: Mapping[str, str] | None = None, classes: Any = None) -> Any:
    """dafne-dl's helper: compile source text to a function; anything else is returned as it is."""
    if not isinstance(source, str):
        return source
    return compile_function(source, "function", patches)


def model_function(function: F) -> F:
    """Decorator for model functions fedmq ships: recompile the function from its own source.

    The result is the function as a blob's reader will see it, so a function that is not
    self-contained (that uses a module-level name) fails in fedmq's own tests, not on a worker.
    """
    source = textwrap.dedent(_strip_own_decorator(inspect.getsource(function)))
    compiled = compile_function(source, function.__name__, patches={})
    compiled.__doc__ = function.__doc__
    return compiled
