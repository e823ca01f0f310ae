"""Fixtures for end-to-end tests: a fedmq deployment (tests/integration/cluster.py) per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cluster import Cluster


@pytest.fixture
def cluster(tmp_path: Path, rabbitmq, database_url: str) -> Iterator[Cluster]:
    """A deployment on the suite's RabbitMQ, once on SQLite and once on PostgreSQL."""
    c = Cluster.create(tmp_path, database_url, rabbitmq.amqp_url, Path(rabbitmq.node.directory))
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def sqlite_cluster(tmp_path: Path, rabbitmq) -> Iterator[Cluster]:
    """For tests of the transport and aggregation paths, where the database backend does not matter."""
    c = Cluster.create(
        tmp_path, f"sqlite:///{tmp_path / 'fedmq.db'}", rabbitmq.amqp_url, Path(rabbitmq.node.directory)
    )
    try:
        yield c
    finally:
        c.stop_all()
