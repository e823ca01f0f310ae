"""The ``fedmq`` command: registers one sub-app per command group.

Each group lives in its own module, parses its arguments, calls the library and prints. Errors of
the :class:`~common.errors.FedmqError` tree become one clear line on stderr and exit code 1, never
a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from common.errors import FedmqError
from coordinator.cli import bench, daemons, db, demo, dev, jobs, keys, models, rounds, workers

app = typer.Typer(
    name="fedmq",
    help="Federated learning over RabbitMQ: models with lineage in SQL, signed releases, edge workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(keys.app, name="keys")
app.add_typer(bench.app, name="bench")
app.add_typer(demo.app, name="demo")
app.add_typer(db.app, name="db")
app.add_typer(models.app, name="models")
app.add_typer(daemons.coordinator_app, name="coordinator")
app.add_typer(daemons.worker_app, name="worker")
app.add_typer(rounds.app, name="rounds")
app.add_typer(workers.app, name="workers")
app.add_typer(jobs.app, name="jobs")
app.add_typer(dev.app, name="dev")


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages to stderr."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main() -> None:
    """Console-script entry point: run the app, turning fedmq errors into one-line messages."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    try:
        app()
    except FedmqError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(1)


if __name__ == "__main__":
    main()
