"""`fedmq dev broker start|status|stop` drives a private RabbitMQ node and prints the URL to use."""

from __future__ import annotations

import shutil
import tempfile

import pika
import pytest
import typer
from typer.testing import CliRunner

from coordinator.cli import dev
from tests.fixtures.ports import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def fedmq() -> typer.Typer:
    root = typer.Typer()
    root.add_typer(dev.app, name="dev")
    return root


def test_dev_broker_start_status_stop(fedmq):
    directory = tempfile.mkdtemp(
        prefix="fedmq-devcli-"
    )  # outside pytest's 0700 dirs: the node runs as rabbitmq
    port = free_port()
    runner = CliRunner()
    try:
        started = runner.invoke(fedmq, ["dev", "broker", "start", "--dir", directory, "--port", str(port)])
        assert started.exit_code == 0, started.output
        url = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
        assert f"FEDMQ_AMQP_URL={url}" in started.output
        pika.BlockingConnection(pika.URLParameters(url)).close()

        status = runner.invoke(fedmq, ["dev", "broker", "status", "--dir", directory])
        assert status.exit_code == 0 and url in status.output

        stopped = runner.invoke(fedmq, ["dev", "broker", "stop", "--dir", directory])
        assert stopped.exit_code == 0 and "stopped" in stopped.output

        after = runner.invoke(fedmq, ["dev", "broker", "status", "--dir", directory])
        assert after.exit_code == 1 and "no RabbitMQ node" in after.output
    finally:
        runner.invoke(fedmq, ["dev", "broker", "stop", "--dir", directory])
        shutil.rmtree(directory, ignore_errors=True)
