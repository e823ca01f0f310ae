"""The development node's helpers that need no running RabbitMQ."""

from __future__ import annotations

import resource
import socket
import subprocess
from pathlib import Path

import pytest

from common import devbroker, ports
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


def test_every_node_gets_an_env_file_that_raises_its_open_files_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(devbroker, "_running_as_root", lambda: False)  # no chown to the rabbitmq user
    node = devbroker.DevNode(directory=str(tmp_path), nodename="n@localhost", port=5000, dist_port=5001)

    devbroker._write_layout(node, None)  # what start() writes before it runs rabbitmq-server
    env = devbroker._node_env(node)  # the environment of rabbitmq-server and rabbitmqctl

    env_file = Path(env["RABBITMQ_CONF_ENV_FILE"])
    assert env_file == tmp_path / devbroker.ENV_FILE and env_file.is_file()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def as_after_su() -> None:  # the soft limit su's PAM session leaves
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))

    # RabbitMQ's rabbitmq-env sources the file like this, in sh, as the node's user.
    shell = subprocess.run(
        ["sh", "-c", '. "$RABBITMQ_CONF_ENV_FILE"; ulimit -n'],
        env=env,
        preexec_fn=as_after_su,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout.strip() == (str(hard) if hard != resource.RLIM_INFINITY else "65536")
    assert int(shell.stdout) > 1024
    # ... and tells the Erlang schedulers not to spin: the node shares its cores with our processes.
    args = subprocess.run(
        ["sh", "-c", '. "$RABBITMQ_CONF_ENV_FILE"; echo "$SERVER_ADDITIONAL_ERL_ARGS"'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert args == ["+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none"]


def test_free_ports_come_from_outside_the_range_clients_connect_from():
    # A port from the ephemeral range can be taken by a client's connection before (or while, on a
    # restart) the server binds it; RabbitMQ then exits at boot.
    low, high = ports.ephemeral_range()

    chosen = [ports.free_port() for _ in range(50)]

    assert all(not low <= port <= high and port >= 1024 for port in chosen)
    for port in chosen[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free a moment ago, so free now on a quiet machine


def test_free_port_falls_back_to_the_os_when_the_ephemeral_range_leaves_no_room(tmp_path, monkeypatch):
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("1024\t65535\n")
    monkeypatch.setattr(ports, "_RANGE_FILE", range_file)

    port = ports.free_port()

    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
