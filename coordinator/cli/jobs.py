"""``fedmq jobs``: apply (inference) jobs run by a worker, submitted through the control queue."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console

from common import codec
from common.errors import ConfigError, NotFoundError
from common.messages import SubmitJob
from common.settings import load_settings
from coordinator.control import new_id, submit
from coordinator.db import Database, require_current
from coordinator.jobs import JobView, job_view

app = typer.Typer(
    help="Run a model on inputs at a worker (apply jobs) and fetch the results.", no_args_is_help=True
)
submit_app = typer.Typer(help="Submit a job.", no_args_is_help=True)
app.add_typer(submit_app, name="submit")
_console = Console(highlight=False)


def _load_input(path: Path) -> list[np.ndarray]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return [np.asarray(npz[k]) for k in npz.files]
        return [np.load(path, allow_pickle=False)]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def _view(job_id: str) -> JobView:
    db = Database.from_settings(load_settings())
    try:
        require_current(db)
        return job_view(db, job_id)
    finally:
        db.dispose()


def _wait(job_id: str, timeout_s: float) -> JobView:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            view = _view(job_id)
            if view.state != "pending":
                return view
        except NotFoundError:
            pass
        if time.monotonic() > deadline:
            raise ConfigError(
                f"job {job_id} has no result after {timeout_s:.0f} s (see `fedmq jobs result {job_id}`)"
            )
        time.sleep(0.3)


def _print(view: JobView, out: Path | None, as_json: bool) -> None:
    if out is not None and view.outputs is not None:
        if out.suffix == ".npz":
            np.savez(out, *view.outputs)
        else:
            np.save(out, view.outputs[0])
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "job_id": view.job_id,
                    "model": view.model,
                    "version": view.version,
                    "state": view.state,
                    "worker": view.worker,
                    "error": view.error,
                    "outputs": [o.tolist() for o in view.outputs] if view.outputs is not None else None,
                }
            )
        )
        return
    _console.print(f"job [bold]{view.job_id}[/]: {view.model} v{view.version} on {view.worker}: {view.state}")
    if view.error:
        _console.print(f"error: {view.error}")
    for i, output in enumerate(view.outputs or []):
        _console.print(f"output {i}: {output.dtype} {output.shape}")
        if output.ndim == 2 and output.shape[1] > 1:
            _console.print(f"  argmax per row: {output.argmax(axis=1).tolist()[:50]}")
    if out is not None and view.outputs is not None:
        _console.print(f"written to {out}")


@submit_app.command("apply")
def submit_apply(
    model: str = typer.Argument(..., help="The registered model to apply."),
    input: Path = typer.Option(
        ..., "--input", "-i", help="A .npy array (or .npz of arrays) to apply the model to."
    ),
    version: int = typer.Option(None, "--version", help="Model version (default: the newest active one)."),
    worker: str = typer.Option(None, "--worker", help="Run at this worker (default: the one seen last)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the result and print it."),
    out: Path = typer.Option(None, "--out", "-o", help="With --wait: write the outputs to this .npy/.npz."),
) -> None:
    """Submit an apply job; prints its id (fetch the result with `fedmq jobs result ID`).

    Example: fedmq jobs submit apply digits --input samples.npy --wait
    """
    arrays = _load_input(input)
    job_id = new_id()
    submit(
        load_settings(),
        SubmitJob(
            job_id=job_id, model=model, version=version, worker=worker, payload=codec.encode_weights(arrays)
        ),
    )
    _console.print(f"job [bold]{job_id}[/] submitted")
    if wait:
        view = _wait(job_id, 120.0)
        _print(view, out, as_json=False)
        if view.state != "done":
            raise typer.Exit(1)


@app.command("result")
def result_command(
    job_id: str = typer.Argument(..., help="The job id printed by `fedmq jobs submit`."),
    out: Path = typer.Option(
        None, "--out", "-o", help="Write the outputs to this .npy (first output) or .npz."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON, outputs included."),
) -> None:
    """Show a job's state and outputs.

    Example: fedmq jobs result 3f2a9c1d0b7e --out predictions.npy
    """
    _print(_view(job_id), out, as_json)
