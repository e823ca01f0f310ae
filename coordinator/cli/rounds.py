"""``fedmq rounds``: start training runs through the control queue, follow and cancel them."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from common.broker.topology import CONTROL_QUEUE, dead_letter_queue_name
from common.errors import ConfigError, NotFoundError
from common.messages import CancelRun, StartRun
from common.settings import load_settings
from coordinator.control import RUN_MODES, check_start_run, new_id, submit
from coordinator.db import Database, require_current
from coordinator.reports import RunView, list_runs, run_view
from coordinator.strategies import get_strategy, strategy_names, strategy_option_names
from coordinator.strategies.combiners import WeightedMean

app = typer.Typer(help="Start, follow, list and cancel training runs.", no_args_is_help=True)
_console = Console(highlight=False)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_CONTROL_DLQ = dead_letter_queue_name(CONTROL_QUEUE)
DEFAULT_START_TIMEOUT = "60s"


def parse_duration(text: str, what: str = "deadline") -> float:
    """``90``, ``90s``, ``10m``, ``1h`` -> seconds; bounds are the caller's to check."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    try:
        return float(number) * (unit or 1.0)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a duration (examples: 90s, 10m, 1h)") from None


def start_timeout_seconds(text: str) -> float:
    value = parse_duration(text, "--start-timeout")
    if not 0 < value < math.inf:
        raise ConfigError(f"--start-timeout must be a positive duration, not {text!r}")
    return value


def parse_options(pairs: list[str]) -> dict[str, object]:
    """``k=v`` pairs; values parsed as JSON when they can be (numbers, true/false), else strings."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"option {pair!r} is not key=value")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def _db() -> Database:
    db = Database.from_settings(load_settings())
    require_current(db)
    return db


def render_run(view: RunView) -> Table:
    table = Table(
        title=f"run {view.run_id}: {view.model}, {view.state} ({view.rounds_done}/{view.rounds_total} rounds)"
    )
    for column in ("round", "state", "base", "new", "deltas (accepted/answered/tasks)", "accuracy", "note"):
        table.add_column(column)
    for r in view.rounds:
        accuracy = r.metrics.get("eval_accuracy", r.metrics.get("workers_local_accuracy_after"))
        rejected = [d for d in r.deltas if d.status == "rejected"]
        note = r.reason or "; ".join(f"{d.worker}: {d.reason}" for d in rejected)
        table.add_row(
            str(r.number),
            r.state,
            f"v{r.base_version}",
            f"v{r.result_version}" if r.result_version else "",
            f"{r.accepted}/{r.answered}/{r.tasks}",
            f"{accuracy:.3f}" if isinstance(accuracy, float) else "",
            note,
        )
    return table


def strategies_help() -> str:
    """The registered strategies, their options with defaults, and which weigh deltas by sample count."""
    probe = [np.zeros(1, dtype=np.float32)]
    lines, wrappers = [], []
    for name in strategy_names():
        strategy = get_strategy(name)
        options = ", ".join(f"{key}={_option_text(value)}" for key, value in strategy.options.items())
        weighted = isinstance(strategy.combiner(probe), WeightedMean)
        lines.append(f"{name} ({'sample-weighted mean' if weighted else 'ignores sample counts'}): {options}")
        wrappers = [key for key in strategy_option_names(name) if key not in strategy.options]
    return (
        "Strategies (--strategy) and their options with defaults (--option k=v):\n"
        + "\n".join(lines)
        + f"\n\nEvery strategy also accepts {', '.join(wrappers)}; dp_noise needs clip and makes every"
        " delta weigh the same. A strategy that ignores sample counts (or runs with dp_noise) ignores"
        " async staleness weights too. Formulas and ranges: docs/strategies.md."
    )


def _option_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def follow(run_id: str, start_timeout_s: float, poll_s: float = 0.5) -> RunView:
    """Show live progress until the run ends; return its final view.

    A run the coordinator has not recorded within ``start_timeout_s`` is a ConfigError: the
    coordinator refused it (the submission was dead-lettered with its reason) or is not running.
    """
    db = _db()
    started = time.monotonic()
    try:
        with Live(console=_console, refresh_per_second=4) as live:
            while True:
                try:
                    view: RunView | None = run_view(db, run_id)
                except NotFoundError:  # not recorded yet: the coordinator has not consumed it
                    view = None
                live.update(
                    render_run(view) if view else Group(f"waiting for the coordinator to start {run_id}…")
                )
                if view is not None and view.state != "running":
                    return view
                if view is None and time.monotonic() - started > start_timeout_s:
                    raise ConfigError(
                        f"run {run_id} was not recorded within {start_timeout_s:g} s: the coordinator "
                        f"refused it (the submission is in the dead-letter queue {_CONTROL_DLQ}, its reason "
                        "in the x-fedmq-reason header) or is not running"
                    )
                time.sleep(poll_s)
    finally:
        db.dispose()


@app.command("start", epilog=strategies_help())
def start_command(
    model: str = typer.Argument(..., help="The registered model to train."),
    rounds: int = typer.Option(
        1, "--rounds", "-r", help="Number of rounds (async: versions to produce), >= 1."
    ),
    min_workers: int = typer.Option(
        1, "--min-workers", "-k", help="Deltas needed to aggregate a round (async: the buffer size K), >= 1."
    ),
    deadline: str = typer.Option(
        "10m", "--deadline", help="How long a round waits for deltas (90s, 10m, 1h; at most 365 days)."
    ),
    fraction: float = typer.Option(
        1.0, "--fraction", help="Fraction of live workers to ask each round, in (0, 1]."
    ),
    worker: list[str] = typer.Option([], "--worker", "-w", help="Ask only these workers (repeatable)."),
    strategy: str = typer.Option(
        "fedavg",
        "--strategy",
        metavar="NAME",
        help=f"Aggregation strategy: {', '.join(strategy_names())} (their options below).",
    ),
    option: list[str] = typer.Option([], "--option", "-o", help="Strategy option key=value (repeatable)."),
    train: list[str] = typer.Option([], "--train", help="Worker training option key=value, e.g. epochs=2."),
    eval_data: str = typer.Option(
        None,
        "--eval-data",
        help="Held-out .npz (x, y) on the coordinator's machine: each version's accuracy is recorded.",
    ),
    mode: str = typer.Option(
        "sync",
        "--mode",
        metavar="|".join(RUN_MODES),
        help="sync: rounds wait for a quorum; async (FedBuff): a new version every K = --min-workers"
        " deltas, each delta's sample count weighted by 1/sqrt(1 + s), s = its staleness (versions"
        " produced since the version it trained).",
    ),
    max_staleness: int = typer.Option(
        10,
        "--max-staleness",
        help="async: reject deltas more than this many versions behind (>= 0); the others weigh"
        " 1/sqrt(1 + staleness).",
    ),
    max_norm: float = typer.Option(
        None,
        "--max-norm",
        help="Reject deltas whose L2 norm exceeds this (to clip instead: --option clip=C).",
    ),
    max_samples: int = typer.Option(
        None, "--max-samples", help="Reject deltas claiming more samples than this (>= 1)."
    ),
    wait: bool = typer.Option(
        False,
        "--wait",
        help="Follow the run's progress until it ends (exit 1 unless it completes). If the"
        " coordinator has not recorded the run within --start-timeout, exit 1 with an error: it"
        f" refused the submission (dead-lettered to {_CONTROL_DLQ} with its reason) or is not running.",
    ),
    start_timeout: str = typer.Option(
        DEFAULT_START_TIMEOUT,
        "--start-timeout",
        help="With --wait: how long to wait for the coordinator to record the run (90s, 10m).",
    ),
) -> None:
    """Submit a training run to the coordinator (through the control queue).

    The whole submission is checked first, with the coordinator's own check: a bad value is an error and nothing is submitted.

    In async mode every worker trains continuously on the newest version it is given; the coordinator aggregates every K accepted deltas (K = --min-workers), weighting each delta's sample count by 1/sqrt(1 + staleness), and --rounds counts the versions to produce.

    Example: fedmq rounds start digits --rounds 10 --min-workers 3 --deadline 5m --train epochs=2 --wait
    """
    run_id = new_id()
    message = StartRun(
        run_id=run_id,
        model=model,
        rounds=rounds,
        min_workers=min_workers,
        deadline_s=parse_duration(deadline),
        fraction=fraction,
        workers=list(worker),
        strategy=strategy,
        options=parse_options(option),
        train=parse_options(train),
        eval_data=str(Path(eval_data).resolve()) if eval_data else None,
        mode=mode,
        max_staleness=max_staleness,
        max_norm=max_norm,
        max_samples=max_samples,
    )
    check_start_run(message)
    start_timeout_s = start_timeout_seconds(start_timeout) if wait else 0.0
    submit(load_settings(), message)
    _console.print(f"run [bold]{run_id}[/] submitted: {rounds} rounds of {model}")
    if wait:
        view = follow(run_id, start_timeout_s)
        if view.state != "completed":
            raise typer.Exit(1)


@app.command("list")
def list_command(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List runs, newest first.

    Example: fedmq rounds list
    """
    db = _db()
    try:
        runs = list_runs(db)
    finally:
        db.dispose()
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in runs], indent=2))
        return
    table = Table("run", "model", "state", "rounds", "strategy", "reason")
    for r in runs:
        table.add_row(
            r.run_id, r.model, r.state, f"{r.rounds_done}/{r.rounds_total}", r.strategy, r.reason or ""
        )
    _console.print(table)


@app.command("show")
def show_command(
    run_id: str = typer.Argument(..., help="The run id printed by `fedmq rounds start`."),
    watch: bool = typer.Option(
        False,
        "--watch",
        help=f"Follow live progress until the run ends (error if it is not recorded within {DEFAULT_START_TIMEOUT}).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with every delta and rejection reason)."),
) -> None:
    """Show a run's rounds: deltas received, accepted and rejected (with reasons), accuracy.

    Example: fedmq rounds show 3f2a9c1d0b7e --watch
    """
    if watch:
        follow(run_id, start_timeout_seconds(DEFAULT_START_TIMEOUT))
        return
    db = _db()
    try:
        view = run_view(db, run_id)
    finally:
        db.dispose()
    if as_json:
        typer.echo(json.dumps(view.to_json(), indent=2))
    else:
        _console.print(render_run(view))


@app.command("cancel")
def cancel_command(
    run_id: str = typer.Argument(..., help="The run to cancel."),
    reason: str = typer.Option("cancelled by an admin", "--reason", help="Recorded with the run."),
) -> None:
    """Cancel a run: its open round stops and no further round starts.

    Example: fedmq rounds cancel 3f2a9c1d0b7e --reason "wrong data"
    """
    submit(load_settings(), CancelRun(run_id=run_id, reason=reason))
    _console.print(f"cancellation of run [bold]{run_id}[/] submitted")
