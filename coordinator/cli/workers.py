"""``fedmq workers``: add, list and revoke workers."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from common.settings import load_settings
from coordinator.db import Database, require_current
from coordinator.workers import add_worker, list_workers, revoke_worker

app = typer.Typer(help="Add, list and revoke workers (each has its own broker user).", no_args_is_help=True)
_console = Console(highlight=False)

BROKER_DIR_HELP = "Directory of the local RabbitMQ node (`fedmq dev broker`) whose users to manage."


def _db() -> Database:
    db = Database.from_settings(load_settings())
    require_current(db)
    return db


@app.command("add")
def add_command(
    name: str = typer.Argument(..., help="The worker's name (letters, digits, - and _)."),
    out: Path = typer.Option(
        None, "--out", "-o", help="Where to write the worker config (default .fedmq/workers/NAME.toml)."
    ),
    data: str = typer.Option(None, "--data", help="Local data directory to record in the config."),
    broker_dir: Path = typer.Option(Path(".fedmq/rabbitmq"), "--broker-dir", help=BROKER_DIR_HELP),
    no_broker_user: bool = typer.Option(
        False, "--no-broker-user", help="Do not create the broker user (made elsewhere)."
    ),
    password: str = typer.Option(None, "--password", help="The broker password (default: a new random one)."),
    threads: int = typer.Option(
        None,
        "--threads",
        min=1,
        help="CPU threads the worker's model code may use (BLAS, OpenMP, TensorFlow), written into "
        "the config (`fedmq worker run --threads` overrides it). Default: every core. Give each of "
        "N workers sharing a machine cores/N.",
    ),
) -> None:
    """Create a worker: broker user and queues, registry row, config file (mode 0600).

    Example: fedmq workers add alice --data data/alice --threads 2
    """
    db = _db()
    try:
        path = out or Path(".fedmq") / "workers" / f"{name}.toml"
        added = add_worker(
            load_settings(),
            db,
            name,
            path,
            broker_dir=None if no_broker_user else broker_dir,
            password=password,
            data=data,
            threads=threads,
        )
    finally:
        db.dispose()
    _console.print(f"worker [bold]{added.name}[/] added; start it with:")
    _console.print(f"  fedmq worker run --config {added.config_path}" + ("" if data else " --data DIR"))


@app.command("list")
def list_command(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List workers with their status and when they were last seen.

    Example: fedmq workers list --json
    """
    db = _db()
    try:
        workers = list_workers(db)
    finally:
        db.dispose()
    rows = [
        {
            "name": w.name,
            "status": w.status,
            "last_seen": w.last_seen_at.isoformat() if w.last_seen_at else None,
            "device": (w.info or {}).get("device"),
            "samples": (w.info or {}).get("samples"),
        }
        for w in workers
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "status", "last seen", "device", "samples")
    for r in rows:
        table.add_row(
            r["name"], r["status"], r["last_seen"] or "never", str(r["device"] or ""), str(r["samples"] or "")
        )
    _console.print(table)


@app.command("revoke")
def revoke_command(
    name: str = typer.Argument(..., help="The worker to revoke."),
    broker_dir: Path = typer.Option(Path(".fedmq/rabbitmq"), "--broker-dir", help=BROKER_DIR_HELP),
) -> None:
    """Revoke a worker: its broker user is deleted and its deltas are refused from now on.

    Example: fedmq workers revoke alice
    """
    db = _db()
    try:
        revoke_worker(db, name, broker_dir=broker_dir)
    finally:
        db.dispose()
    _console.print(f"worker [bold]{name}[/] revoked")
