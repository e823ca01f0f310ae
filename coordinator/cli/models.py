"""`fedmq models`: register, inspect, roll back, compare and export models in the registry.

Parses arguments, calls :class:`coordinator.registry.ModelRegistry`, prints rich tables (or JSON
with ``--json``). Errors are fedmq errors; the ``fedmq`` entry point prints them as one line and
exits 1. Commands that run model code say so: ``register`` runs the user's own Python file or
Keras model, ``import`` runs a dafne blob's code and therefore needs ``--trust``, and ``export`` of a
dafne or Keras file builds the model from the registry's (trusted, signed) code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from common.errors import ModelError, RequestError
from common.model import DynamicDLModel
from common.settings import load_settings
from coordinator.cli.db import URL_HELP
from coordinator.db import Database, require_current
from coordinator.registry import KeySigner, ModelRegistry, VersionInfo

app = typer.Typer(
    help="Register models and manage their versions: list, show, versions, diff, rollback, export, delete.",
    no_args_is_help=True,
)
_console = Console(soft_wrap=True, highlight=False)

JSON_HELP = "Print the result as JSON (for scripts)."


class ExportFormat(StrEnum):
    dafne = "dafne"
    keras = "keras"
    weights_npz = "weights-npz"


_SUFFIX = {ExportFormat.dafne: ".model", ExportFormat.keras: ".keras", ExportFormat.weights_npz: ".npz"}


@contextmanager
def open_registry(url: str | None, *, signing: bool = False) -> Iterator[ModelRegistry]:
    """The registry on the configured database (schema checked); the signing key only if needed."""
    settings = load_settings(database_url=url)
    db = Database.from_settings(settings)
    try:
        require_current(db)
        signer = KeySigner.from_settings(settings) if signing else _NoSigner()
        yield ModelRegistry(db, signer)
    finally:
        db.dispose()


class _NoSigner:
    def sign(self, payload: bytes, *, kind: str, model: str, version: int) -> bytes:
        raise RequestError("this command cannot sign")  # pragma: no cover - read-only commands


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RequestError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


# ------------------------------------------------------------------------------------ registering


def model_from_python_file(path: Path, function: str) -> DynamicDLModel:
    """Run the user's Python file and call ``function()``; it must return a DynamicDLModel."""
    source = _read_file(path, "Python file")
    module_name = f"fedmq_user_model_{hashlib.sha256(source).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RequestError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        factory = getattr(module, function, None)
        if not callable(factory):
            found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise RequestError(
                f"{path} has no function {function!r} (found: {', '.join(found) or 'none'}); "
                "name it with --function"
            )
        model = factory()
    except (RequestError, ModelError):
        raise
    except Exception as exc:  # the user's code may raise anything
        raise ModelError(f"{path}: {function}() failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.modules.pop(module_name, None)
    if not isinstance(model, DynamicDLModel):
        raise ModelError(f"{path}: {function}() returned a {type(model).__name__}, not a DynamicDLModel")
    return model


def _model_from_source(path: Path, function: str, name: str) -> DynamicDLModel:
    if path.suffix == ".py":
        return model_from_python_file(path, function)
    if path.suffix == ".keras":
        _read_file(path, "Keras file")  # a clear message for a missing or unreadable file
        from common.model.keras_model import model_from_keras_file

        return model_from_keras_file(path, model_id=name)
    raise RequestError(
        f"{path}: register takes a .py or .keras file (use `fedmq models import` for a dafne blob)"
    )


def _store_model(
    registry: ModelRegistry, name: str, model: DynamicDLModel, description: str | None, note: str
) -> VersionInfo:
    from common.model.bundle import split_model

    code, weights = split_model(model)
    timestamp = model.timestamp_id if isinstance(model.timestamp_id, int) else None
    return registry.register(name, code, weights, description=description, timestamp_id=timestamp, note=note)


def _print_stored(info: VersionInfo, as_json: bool) -> None:
    if as_json:
        _echo_json(info.to_json())
    else:
        _console.print(
            f"stored {info.model} v{info.version}: {info.array_count} arrays, "
            f"{info.parameter_count:,} parameters, sha256 {info.weights_sha256[:16]}"
        )


@app.command()
def register(
    name: str = typer.Argument(..., help="Registry name of the new model."),
    source: Path = typer.Argument(
        ..., help="A .py file with a function returning a DynamicDLModel, or a .keras file."
    ),
    function: str = typer.Option("make_model", "--function", "-f", help="Function to call in a .py file."),
    description: str | None = typer.Option(None, "--description", "-d", help="Free text shown by `show`."),
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Register a new model (version 1) from a Python file or a Keras .keras file.

    A .py file is run and its function (default make_model) must return a DynamicDLModel; a .keras
    model is wrapped with fedmq's default Keras functions. The code is signed with the coordinator's
    key (fedmq keys generate).

    Example: fedmq models register digits examples/digits_model.py --function make_model
    """
    model = _model_from_source(source, function, name)
    with open_registry(url, signing=True) as registry:
        info = _store_model(registry, name, model, description, note=f"registered from {source.name}")
    _print_stored(info, as_json)


@app.command("import")
def import_blob(
    name: str = typer.Argument(..., help="Registry name of the new model."),
    blob: Path = typer.Argument(..., help="A dafne-dl model blob (dafne-dl 1.4 or 2.x)."),
    trust: bool = typer.Option(
        False, "--trust", help="Confirm you trust the blob: loading it runs its code."
    ),
    description: str | None = typer.Option(None, "--description", "-d", help="Free text shown by `show`."),
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Register a new model from a dafne-dl blob. Loading a blob unpickles it and runs its code: --trust.

    Example: fedmq models import thigh thigh_model.model --trust
    """
    if not trust:
        raise RequestError(f"importing {blob} unpickles it and runs its code: pass --trust if you trust it")
    data = _read_file(blob, "dafne blob")
    from common.model.blob import load_blob

    model = load_blob(data)
    with open_registry(url, signing=True) as registry:
        info = _store_model(registry, name, model, description, note=f"imported from {blob.name}")
    _print_stored(info, as_json)


# ------------------------------------------------------------------------------------ reading


@app.command("list")
def list_models(
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List registered models with their latest version.

    Example: fedmq models list --json
    """
    with open_registry(url) as registry:
        models = registry.list_models()
    if as_json:
        _echo_json([m.to_json() for m in models])
        return
    table = Table("name", "model id", "type", "latest", "versions", "created")
    for m in models:
        table.add_row(
            m.name,
            m.model_id,
            m.model_type,
            str(m.latest_version),
            str(m.version_count),
            f"{m.created_at:%Y-%m-%d %H:%M}",
        )
    _console.print(table if models else "no models registered (see `fedmq models register --help`)")


@app.command()
def show(
    name: str = typer.Argument(..., help="Model name."),
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show a model: ids, code digest and functions, metadata, and its latest version.

    Example: fedmq models show digits
    """
    with open_registry(url) as registry:
        model = registry.get_model(name)
        code = registry.model_code(name)
        latest = registry.version(name)
    functions = sorted(k for k, v in code.functions.items() if v is not None)
    if as_json:
        _echo_json(
            {**model.to_json(), "functions": functions, "metadata": code.metadata,
             "data_dimensionality": code.data_dimensionality, "latest": latest.to_json()}
        )  # fmt: skip
        return
    table = Table(show_header=False)
    for key, value in (
        ("name", model.name),
        ("model id", model.model_id),
        ("type", f"{model.model_type}, {code.data_dimensionality}-D data"),
        ("description", model.description or ""),
        ("created", model.created_at.isoformat(timespec="seconds")),
        ("code sha256", model.code_sha256),
        ("functions", ", ".join(functions)),
        ("metadata", json.dumps(code.metadata, default=str)),
        ("latest version", f"v{latest.version} ({latest.status}), {latest.parameter_count:,} parameters"),
        ("weights sha256", latest.weights_sha256),
        ("versions", str(model.version_count)),
    ):
        table.add_row(key, value)
    _console.print(table)


@app.command()
def versions(
    name: str = typer.Argument(..., help="Model name."),
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List a model's versions with lineage (parent), status, provenance and metrics.

    Example: fedmq models versions digits
    """
    with open_registry(url) as registry:
        rows = registry.versions(name)
    if as_json:
        _echo_json([v.to_json() for v in rows])
        return
    table = Table("version", "parent", "status", "created", "made by", "sha256", "metrics")
    for v in rows:
        made_by = v.strategy or "registered"
        if v.round_id is not None:
            made_by += f" (round {v.round_id})"
        table.add_row(
            str(v.version),
            str(v.parent_version or "-"),
            v.status,
            f"{v.created_at:%Y-%m-%d %H:%M:%S}",
            made_by,
            v.weights_sha256[:12],
            json.dumps(v.metrics) if v.metrics else "",
        )
    _console.print(table)


@app.command()
def diff(
    name: str = typer.Argument(..., help="Model name."),
    version_a: int = typer.Argument(..., help="First version."),
    version_b: int = typer.Argument(..., help="Second version."),
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Per-array L2 norm of the difference between two versions (B - A), and relative to A.

    Example: fedmq models diff digits 1 5
    """
    with open_registry(url) as registry:
        layers = registry.diff(name, version_a, version_b)
    if as_json:
        _echo_json([layer.to_json() for layer in layers])
        return
    table = Table("array", "shape", "dtype", "L2 (B - A)", "relative")
    for layer in layers:
        shape = (
            str(layer.shape_b) if layer.shape_a == layer.shape_b else f"{layer.shape_a} -> {layer.shape_b}"
        )
        table.add_row(
            str(layer.index),
            shape,
            layer.dtype,
            "shape differs" if layer.l2 is None else f"{layer.l2:.6g}",
            "" if layer.relative is None else f"{layer.relative:.3%}",
        )
    _console.print(table)


# ------------------------------------------------------------------------------------ changing


@app.command()
def rollback(
    name: str = typer.Argument(..., help="Model name."),
    version: int = typer.Argument(..., help="The version whose weights become the latest again."),
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Make a new version with an old version's weights; the versions after it are marked rolled back.

    Nothing is deleted: the lineage keeps every version.

    Example: fedmq models rollback digits 3
    """
    with open_registry(url, signing=True) as registry:
        info = registry.rollback(name, version)
    if as_json:
        _echo_json(info.to_json())
    else:
        _console.print(f"{name} v{info.version} now has the weights of v{version}")


@app.command()
def delete(
    name: str = typer.Argument(..., help="Model name."),
    force: bool = typer.Option(False, "--force", help="Required: deleting removes every version."),
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
) -> None:
    """Delete a model with all its versions, rounds and jobs. Needs --force.

    Example: fedmq models delete old-digits --force
    """
    with open_registry(url) as registry:
        count = registry.delete(name, force=force)
    _console.print(f"deleted {name} and its {count} versions")


@app.command()
def export(
    name: str = typer.Argument(..., help="Model name."),
    format: ExportFormat = typer.Option(
        ..., "--format", help="dafne (dafne-dl blob), keras, or weights-npz."
    ),
    version: int | None = typer.Option(None, "--version", "-v", help="Version to export (default: latest)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output file (default: NAME-vN.EXT)."),
    layout: str = typer.Option("2", "--layout", help="dafne blob layout: 2 (dafne-dl 2.x) or 1.4."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Export a version as a dafne-dl blob, a Keras .keras file, or an .npz of its weight arrays.

    Example: fedmq models export digits --version 4 --format dafne -o digits.model
    """
    with open_registry(url) as registry:
        info = registry.version(name, version)
        weights = registry.weights(name, info.version)
        code = registry.model_code(name) if format is not ExportFormat.weights_npz else None
    path = output or Path(f"{name}-v{info.version}{_SUFFIX[format]}")
    if path.exists() and not force:
        raise RequestError(f"{path} exists: pass --force to overwrite it")
    if format is ExportFormat.weights_npz:
        buffer = io.BytesIO()
        np.savez(buffer, *weights)
        _write_atomically(path, buffer.getbuffer())
    else:
        from common.model.bundle import join_model

        assert code is not None
        model = join_model(code, list(weights), timestamp_id=info.timestamp_id)
        if format is ExportFormat.dafne:
            _write_atomically(path, model.dumps(layout=layout))
        else:
            _save_keras(model, path)
    if as_json:
        _echo_json({"model": name, "version": info.version, "format": format.value, "path": str(path)})
    else:
        _console.print(f"exported {name} v{info.version} ({format.value}) to {path}")


def _write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write to a temp file beside ``path`` and rename it into place: no half-written output."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; exports are ordinary files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise RequestError(f"cannot write {path}: {exc.strerror or exc}") from None


def _save_keras(model: DynamicDLModel, path: Path) -> None:
    keras_model = getattr(model, "model", None)
    if not hasattr(keras_model, "save"):
        raise RequestError(
            f"model {model.model_id!r} is not a Keras model: export it as dafne or weights-npz"
        )
    directory = path.parent if str(path.parent) else Path(".")
    tmp = directory / f".{path.stem}.{os.getpid()}.tmp.keras"
    try:
        keras_model.save(tmp)  # type: ignore[union-attr]
        os.replace(tmp, path)
    except OSError as exc:
        raise RequestError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
