"""`fedmq dev broker start|status|stop` drives a private RabbitMQ node and prints the URL to use.

A node that finds its Erlang distribution port taken at boot (another process bound it after
``free_port()`` chose it) is started again on another one.

Every node common/devbroker.py starts (this one, the suite's, the demo's and the benches') may open
more than the 1,024 files Debian's start script leaves it (``su`` resets the soft limit): RabbitMQ
reports its file-handle budget in ``rabbitmqctl status``.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
import typer
from typer.testing import CliRunner

from common import devbroker
from common.errors import DevBrokerError
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


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on, as when it bound the port just after free_port() chose it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def node_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="fedmq-distport-")  # outside pytest's 0700 dirs
    try:
        yield directory
    finally:
        devbroker.stop(directory)
        shutil.rmtree(directory, ignore_errors=True)


def test_a_node_whose_distribution_port_is_taken_starts_on_another(monkeypatch, taken_port, node_dir):
    # Prepare: the first distribution port the node is given is held by another process.
    ports = iter([taken_port])
    monkeypatch.setattr(devbroker, "free_port", lambda: next(ports, None) or free_port())

    # Execute
    node = devbroker.start(node_dir, port=free_port())

    # Assert
    assert node.dist_port != taken_port
    assert devbroker.is_running(node)
    assert "dist_port_already_used" in (Path(node_dir) / "startup.log").read_text()


def test_a_distribution_port_taken_every_time_is_reported_with_the_reason(monkeypatch, taken_port, node_dir):
    monkeypatch.setattr(devbroker, "free_port", lambda: taken_port)
    monkeypatch.setattr(devbroker, "_BOOT_ATTEMPTS", 1)

    with pytest.raises(DevBrokerError, match=r"distribution port was in use .*dist_port_already_used"):
        devbroker.start(node_dir, port=free_port())
