"""`fedmq workers add` against the suite's real RabbitMQ node and a real database."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from coordinator.cli.main import app
from tests.integration.cluster import Cluster
from worker.config import load_worker_config

pytestmark = pytest.mark.integration


def test_workers_add_writes_the_cpu_threads_into_the_workers_config(sqlite_cluster: Cluster):
    cluster = sqlite_cluster
    config = cluster.root / "w-threads.toml"
    broker = ["--broker-dir", str(cluster.broker_dir)]

    result = CliRunner().invoke(
        app,
        ["workers", "add", "w-threads", "--threads", "2", "--out", str(config), *broker],
        env=cluster.env(),
    )
    default = cluster.root / "w-default.toml"
    plain = CliRunner().invoke(
        app, ["workers", "add", "w-default", "--out", str(default), *broker], env=cluster.env()
    )
    refused = CliRunner().invoke(
        app,
        ["workers", "add", "w-zero", "--threads", "0", "--out", str(cluster.root / "z.toml"), *broker],
        env=cluster.env(),
    )

    assert result.exit_code == 0, result.output
    assert load_worker_config(config).threads == 2
    assert plain.exit_code == 0, plain.output
    assert load_worker_config(default).threads is None  # every core, the libraries' default
    assert refused.exit_code == 2 and "--threads" in refused.output  # a usage error, not a traceback
    assert not (cluster.root / "z.toml").exists()
