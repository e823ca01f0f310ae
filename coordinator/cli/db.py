"""`fedmq db`: create and upgrade the coordinator's database schema, and say where it stands.

The database comes from the settings (``FEDMQ_DATABASE_URL``, the config file, or the default
``sqlite:///fedmq.db`` in the working directory); ``--url`` overrides it for one command.
"""

from __future__ import annotations

import json

import typer
from rich.console import Console

from common.settings import load_settings
from coordinator.db import Database, current_revision, head_revision, upgrade
from coordinator.db.engine import wait_for_database

app = typer.Typer(
    help="Create, upgrade and inspect the coordinator's SQL schema (SQLite or PostgreSQL).",
    no_args_is_help=True,
)
_console = Console(soft_wrap=True, highlight=False)

URL_HELP = (
    "Database URL for this command (default: $FEDMQ_DATABASE_URL, the config file, or sqlite:///fedmq.db)."
)


def open_database(url: str | None) -> Database:
    """The Database named by ``url`` or by the settings (validated: ConfigError on a bad value)."""
    return Database.from_settings(load_settings(database_url=url))


@app.command("upgrade")
def upgrade_command(
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    revision: str = typer.Option("head", "--revision", help="Target revision (default: the newest)."),
    wait: float = typer.Option(
        0.0, "--wait", help="Seconds to keep retrying while the database server is unreachable."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Create the schema, or upgrade it to the newest revision. Safe to run again.

    Example: FEDMQ_DATABASE_URL=postgresql://fedmq@db/fedmq fedmq db upgrade --wait 30
    """
    db = open_database(url)
    try:
        if wait > 0:
            wait_for_database(db, wait)
        before, after = upgrade(db, revision)
    finally:
        db.dispose()
    if as_json:
        typer.echo(json.dumps({"database": db.description, "before": before, "after": after}))
    elif before == after:
        _console.print(f"{db.description} is already at revision {after}")
    else:
        _console.print(f"upgraded {db.description} from {before or 'an empty database'} to {after}")


@app.command("current")
def current_command(
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    check: bool = typer.Option(False, "--check", help="Exit with code 1 when the schema is not up to date."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Show the database's schema revision and the revision this fedmq needs.

    Example: fedmq db current --check || fedmq db upgrade
    """
    db = open_database(url)
    try:
        current = current_revision(db)
    finally:
        db.dispose()
    head = head_revision()
    up_to_date = current == head
    if as_json:
        typer.echo(
            json.dumps(
                {"database": db.description, "current": current, "head": head, "up_to_date": up_to_date}
            )
        )
    else:
        state = "up to date" if up_to_date else "out of date: run `fedmq db upgrade`"
        _console.print(f"{db.description}: revision {current or '(none)'}, code needs {head} ({state})")
    if check and not up_to_date:
        raise typer.Exit(1)
