"""`fedmq dev` commands: services for development on one machine.

`fedmq dev broker start|stop|status` manages a private RabbitMQ node (Debian's ``rabbitmq-server``)
in a project-local directory on its own port, and prints the ``FEDMQ_AMQP_URL`` to use.
"""

from __future__ import annotations

from pathlib import Path

import typer

from common import devbroker

app = typer.Typer(help="Development services on this machine.", no_args_is_help=True)
broker_app = typer.Typer(help="A private RabbitMQ node for development.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")

_DIR_OPTION = typer.Option(
    Path(".fedmq/rabbitmq"), "--dir", help="Directory holding the node's data and logs."
)


def _print_node(node: devbroker.DevNode) -> None:
    typer.echo(f"RabbitMQ node {node.nodename} in {node.directory}")
    typer.echo(f"export FEDMQ_AMQP_URL={node.amqp_url}")


@broker_app.command("start")
def start(
    directory: Path = _DIR_OPTION,
    port: int | None = typer.Option(None, "--port", help="AMQP port (a free one when omitted)."),
) -> None:
    """Start the node (or report the one already running) and print its AMQP URL."""
    node = devbroker.start(directory, port=port)
    _print_node(node)


@broker_app.command("status")
def status(directory: Path = _DIR_OPTION) -> None:
    """Print the node's AMQP URL, or exit 1 when no node runs in the directory."""
    node = devbroker.status(directory)
    if node is None:
        typer.echo(f"no RabbitMQ node running in {directory}")
        raise typer.Exit(1)
    _print_node(node)


@broker_app.command("stop")
def stop(directory: Path = _DIR_OPTION) -> None:
    """Stop the node running in the directory."""
    if devbroker.stop(directory):
        typer.echo(f"stopped the RabbitMQ node in {directory}")
    else:
        typer.echo(f"no RabbitMQ node running in {directory}")
