"""``fedmq demo``: the README's demonstration."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from coordinator.demo.core import Step, run_core_demo

app = typer.Typer(help="Demonstrations.", no_args_is_help=False)


@app.callback(invoke_without_command=True)
def demo(
    epochs: int = typer.Option(3, min=1, help="Local epochs the worker trains."),
) -> None:
    """Show a model version's trip: sign, verify, learn on local digits, delta, decode, apply.

    Example: fedmq demo --epochs 5
    """
    console = Console()
    console.rule("fedmq: the model core on scikit-learn's digits")

    def show(step: Step) -> None:
        console.print(f"[bold]{step.side:>11}[/]  {step.what}  [dim]({step.seconds:.2f} s)[/]")
        console.print(f"             {step.detail}")

    result = run_core_demo(show, epochs=epochs)
    table = Table(title="Test accuracy on 397 held-out digits")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_row("version 1 (random init)", f"{result.accuracy_before:.3f}")
    table.add_row("worker after local learning", f"{result.accuracy_after_local:.3f}")
    table.add_row("version 2 = v1 + decoded delta", f"{result.accuracy_after_apply:.3f}")
    console.print(table)
