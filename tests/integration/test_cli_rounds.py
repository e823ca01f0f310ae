"""`fedmq rounds start --wait` against a real coordinator that refuses the submission."""

from __future__ import annotations

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker
from typer.testing import CliRunner

from common.broker.topology import CONTROL_QUEUE, dead_letter_queue_name
from common.errors import ConfigError
from common.messages import StartRun, decode
from coordinator.cli.main import app
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.integration

CONTROL_DLQ = dead_letter_queue_name(CONTROL_QUEUE)


def queue_depth(cluster: Cluster, queue: str) -> int | None:
    """Messages in ``queue``, or None while it does not exist."""
    connection = pika.BlockingConnection(pika.URLParameters(cluster.settings.amqp_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    except ChannelClosedByBroker:
        return None
    finally:
        connection.close()


def test_wait_ends_with_an_error_naming_the_run_and_the_dead_letter_queue_when_the_coordinator_refuses(
    sqlite_cluster: Cluster,
):
    # Prepare: a running coordinator, and no model called "missing" (only the coordinator can tell).
    cluster = sqlite_cluster
    cluster.start_coordinator()
    cluster.wait_for("the control queue", lambda: queue_depth(cluster, CONTROL_DLQ) is not None, 60)

    # Execute
    result = CliRunner().invoke(
        app, ["rounds", "start", "missing", "--wait", "--start-timeout", "15s"], env=cluster.env()
    )

    # Assert: the CLI gave up with a clear error, and the refused submission is in the control
    # queue's dead-letter queue with the coordinator's reason.
    assert result.exit_code == 1 and isinstance(result.exception, ConfigError), result.output
    run_id = result.output.split("run ", 1)[1].split()[0]
    assert f"run {run_id} was not recorded within 15 s" in str(result.exception)
    assert CONTROL_DLQ in str(result.exception)
    cluster.wait_for("the dead letter", lambda: queue_depth(cluster, CONTROL_DLQ) == 1, 60)
    connection = pika.BlockingConnection(pika.URLParameters(cluster.settings.amqp_url))
    try:
        method, properties, body = connection.channel().basic_get(CONTROL_DLQ, auto_ack=True)
    finally:
        connection.close()
    assert method is not None
    assert decode(body, StartRun).run_id == run_id
    assert "model 'missing' does not exist" in (properties.headers or {}).get("x-fedmq-reason", "")
