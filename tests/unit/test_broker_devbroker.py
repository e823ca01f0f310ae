"""The development node's helpers that need no running RabbitMQ."""

from __future__ import annotations

import pytest

from common import devbroker
from common.errors import DevBrokerError


def test_a_missing_rabbitmq_server_names_the_package_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(devbroker, "_SBIN", tmp_path / "sbin")
    monkeypatch.setattr(devbroker, "_LIBBIN", tmp_path / "lib")
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(DevBrokerError, match=r"apt-get install -y rabbitmq-server"):
        devbroker.start(tmp_path / "node")


def test_a_directory_without_a_node_reports_nothing_running(tmp_path):
    assert devbroker.status(tmp_path) is None
    assert devbroker.stop(tmp_path) is False


def test_node_urls_point_at_loopback():
    node = devbroker.DevNode(directory="/x", nodename="n@localhost", port=5000, dist_port=5001, tls_port=5002)

    assert node.amqp_url == "amqp://guest:guest@127.0.0.1:5000/%2F"
    assert node.amqps_url == "amqps://guest:guest@127.0.0.1:5002/%2F"
    assert devbroker.DevNode("/x", "n@localhost", 5000, 5001).amqps_url is None
