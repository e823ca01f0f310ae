"""``fedmq demo``: the README's demonstration (federated digits), and the model-core walk-through."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from coordinator.demo.core import Step, run_core_demo
from coordinator.reports import RunView

app = typer.Typer(help="Demonstrations on scikit-learn's digits.", no_args_is_help=False)
_console = Console(highlight=False)


def _progress_table(view: RunView | None, rounds: int) -> Table | Group:
    if view is None:
        return Group("starting the coordinator and the workers…")
    table = Table(title=f"federated run {view.run_id}: {view.state}, round {len(view.rounds)}/{rounds}")
    for column in ("round", "deltas", "new version", "held-out accuracy"):
        table.add_column(column, justify="right")
    for r in view.rounds:
        acc = r.metrics.get("eval_accuracy")
        table.add_row(
            str(r.number),
            f"{r.accepted}/{r.tasks}",
            f"v{r.result_version}" if r.result_version else "…",
            f"{acc:.3f}" if isinstance(acc, float) else "",
        )
    return table


@app.callback(invoke_without_command=True)
def demo(
    ctx: typer.Context,
    workers: int = typer.Option(6, min=2, max=10, help="Number of worker processes."),
    rounds: int = typer.Option(10, min=1, help="FedAvg rounds."),
    epochs: int = typer.Option(2, min=1, help="Local epochs per round."),
    workdir: Path = typer.Option(Path(".fedmq/demo"), help="Working directory (wiped at the start)."),
) -> None:
    """Federated learning on the digits: a private RabbitMQ, SQLite, a coordinator and N workers.

    Each worker holds a non-IID share (mostly two or three digits). The run's accuracy per round on
    held-out digits is shown beside the same model trained centrally on all the data.

    Example: fedmq demo --workers 6 --rounds 10
    """
    if ctx.invoked_subcommand is not None:
        return
    from coordinator.demo.federated import run_federated_demo

    _console.rule("fedmq demo: federated learning on scikit-learn's digits")
    with Live(console=_console, refresh_per_second=4) as live:
        result = run_federated_demo(
            workdir,
            workers=workers,
            rounds=rounds,
            epochs=epochs,
            progress=lambda view: live.update(_progress_table(view, rounds)),
        )
    for name, classes in result.worker_classes.items():
        _console.print(f"  {name}: mostly digits {', '.join(map(str, classes))}")
    table = Table(title=f"Held-out accuracy (360 digits); before training: {result.initial_accuracy:.3f}")
    for column in ("round", "local epochs so far", "federated (FedAvg)", "centralized, same epochs"):
        table.add_column(column, justify="right")
    for i, (fed, cen) in enumerate(zip(result.federated, result.centralized, strict=True)):
        table.add_row(str(i + 1), str(epochs * (i + 1)), f"{fed:.3f}", f"{cen:.3f}")
    _console.print(table)
    _console.print(
        f"every process and the RabbitMQ node were stopped; the run's records are in {workdir / 'fedmq.db'}"
    )


@app.command("core")
def core(epochs: int = typer.Option(3, min=1, help="Local epochs the worker trains.")) -> None:
    """One version's trip without a broker: sign, verify, learn locally, delta, decode, apply.

    Example: fedmq demo core --epochs 5
    """

    def show(step: Step) -> None:
        _console.print(f"[bold]{step.side:>11}[/]  {step.what}  [dim]({step.seconds:.2f} s)[/]")
        _console.print(f"             {step.detail}")

    _console.rule("fedmq: the model core on scikit-learn's digits")
    result = run_core_demo(show, epochs=epochs)
    table = Table(title="Test accuracy on 397 held-out digits")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_row("version 1 (random init)", f"{result.accuracy_before:.3f}")
    table.add_row("worker after local learning", f"{result.accuracy_after_local:.3f}")
    table.add_row("version 2 = v1 + decoded delta", f"{result.accuracy_after_apply:.3f}")
    _console.print(table)
