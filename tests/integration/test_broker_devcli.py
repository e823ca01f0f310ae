"""`fedmq dev broker start|status|stop` drives a private RabbitMQ node and prints the URL to use.

Every node common/devbroker.py starts (this one, the suite's, the demo's and the benches') may open
more than the 1,024 files Debian's start script leaves it (``su`` resets the soft limit): RabbitMQ
reports its file-handle budget in ``rabbitmqctl status``.
"""

from __future__ import annotations

import json
import shutil
import tempfile

import pika
import pytest
import typer
from typer.testing import CliRunner

from common import devbroker
from coordinator.cli import dev
from tests.fixtures.ports import free_port

pytestmark = pytest.mark.integration


def file_handle_limit(node: devbroker.DevNode) -> int:
    """How many file handles the running node allows itself (from its soft RLIMIT_NOFILE)."""
    status = json.loads(devbroker.rabbitmqctl(node, "status", "--formatter", "json"))
    return int(status["file_descriptors"]["total_limit"])


def test_the_suites_node_may_open_more_than_1024_files(rabbitmq):
    # Debian's script alone gives 927 ("Limiting to approx 927 file handles"); ~100 workers need more.
    assert file_handle_limit(rabbitmq.node) > 1024


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
        node = devbroker.status(directory)
        assert node is not None and file_handle_limit(node) > 1024

        status = runner.invoke(fedmq, ["dev", "broker", "status", "--dir", directory])
        assert status.exit_code == 0 and url in status.output

        stopped = runner.invoke(fedmq, ["dev", "broker", "stop", "--dir", directory])
        assert stopped.exit_code == 0 and "stopped" in stopped.output

        after = runner.invoke(fedmq, ["dev", "broker", "status", "--dir", directory])
        assert after.exit_code == 1 and "no RabbitMQ node" in after.output
    finally:
        runner.invoke(fedmq, ["dev", "broker", "stop", "--dir", directory])
        shutil.rmtree(directory, ignore_errors=True)
