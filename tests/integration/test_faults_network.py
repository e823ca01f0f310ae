"""Broker restarts and network cuts in the middle of a round (issue 6): every client reconnects by
itself, and the round completes with one delta per task."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import devbroker
from common.model.numpy_model import make_linear_model
from tests.fixtures.ports import free_port
from tests.integration.cluster import Cluster
from tests.integration.test_rounds_faults import gaussian_parts
from worker.config import load_worker_config

pytestmark = pytest.mark.integration


class TcpProxy:
    """A loopback TCP proxy the test controls.

    ``cut()`` resets every connection (both ends see it closed at once) and refuses new ones.
    ``blackhole()`` is a dead route instead: every connection stays open but nothing goes through,
    in either direction — bytes and the end of a stream are held — so only a heartbeat can tell a
    peer its connection is gone. ``restore()`` ends either.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._flowing = threading.Event()
        self._flowing.set()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                self._flowing.wait()  # blackholed: hold what came, and the end of the stream too
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def blackhole(self) -> None:
        self._flowing.clear()

    def restore(self) -> None:
        self._open.set()
        self._flowing.set()

    def close(self) -> None:
        self._flowing.set()
        self.cut()
        self.server.close()


@pytest.fixture
def own_node() -> Iterator[devbroker.DevNode]:
    """A RabbitMQ node of this test's own, which it may stop and start."""
    directory = tempfile.mkdtemp(prefix="fedmq-restart-")
    node = devbroker.start(directory, port=free_port())
    try:
        yield node
    finally:
        devbroker.stop(directory)
        shutil.rmtree(directory, ignore_errors=True)


def make_cluster(tmp_path: Path, node: devbroker.DevNode) -> Cluster:
    cluster = Cluster.create(
        tmp_path, f"sqlite:///{tmp_path / 'fedmq.db'}", node.amqp_url, Path(node.directory)
    )
    cluster.settings = dataclasses.replace(cluster.settings, amqp_heartbeat_s=2)
    return cluster


def test_a_rabbitmq_restart_mid_round_loses_nothing(tmp_path: Path, own_node: devbroker.DevNode):
    # Prepare: three workers training long enough to be caught by the restart.
    cluster = make_cluster(tmp_path, own_node)
    try:
        cluster.register("m", make_linear_model(4, 3, model_id="m"))
        for i, part in enumerate(gaussian_parts(3, 3000)):
            cluster.add_worker(f"w{i}", part)
        cluster.start_coordinator()
        for i in range(3):
            cluster.start_worker(f"w{i}")
        run_id = cluster.start_run("m", rounds=2, min_workers=3, train={"epochs": 150, "batch_size": 8})
        cluster.wait_for("training", lambda: "training m v1" in cluster.log("w0"), timeout_s=120)

        # Execute: stop the node (durable queues, persistent messages) and start it again.
        devbroker.stop(own_node.directory)
        time.sleep(3)
        devbroker.start(own_node.directory, port=own_node.port)
        view = cluster.wait_run(run_id, timeout_s=300)

        # Assert
        assert view.state == "completed"
        for r in view.rounds:
            assert sorted(d.worker for d in r.deltas if d.status == "aggregated") == ["w0", "w1", "w2"]
        cluster.check_oracle()
    finally:
        cluster.stop_all()


def _start_behind_a_proxy(cluster: Cluster, node: devbroker.DevNode, proxy: TcpProxy) -> str:
    """Two workers training long enough to be caught; w0 reaches the broker only through ``proxy``,
    with a 2 s AMQP heartbeat. Returns the run's id once w0 trains."""
    cluster.register("m", make_linear_model(4, 3, model_id="m"))
    for i, part in enumerate(gaussian_parts(2, 3000)):
        cluster.add_worker(f"w{i}", part)
    config_path = cluster.root / "workers" / "w0.toml"
    config = load_worker_config(config_path)
    url = config.amqp_url.replace(f":{node.port}/", f":{proxy.port}/")
    dataclasses.replace(config, amqp_url=url, amqp_heartbeat_s=2).write(config_path)
    cluster.start_coordinator()
    for i in range(2):
        cluster.start_worker(f"w{i}")
    run_id = cluster.start_run("m", rounds=2, min_workers=2, train={"epochs": 150, "batch_size": 8})
    cluster.wait_for("training", lambda: "training m v1" in cluster.log("w0"), timeout_s=120)
    return run_id


def test_a_network_cut_that_resets_the_connections_is_survived(tmp_path: Path, own_node: devbroker.DevNode):
    # Prepare
    cluster = make_cluster(tmp_path, own_node)
    proxy = TcpProxy(own_node.port)
    try:
        run_id = _start_behind_a_proxy(cluster, own_node, proxy)

        # Execute: w0's connections are reset and new ones refused for 8 s (four heartbeats).
        proxy.cut()
        time.sleep(8)
        proxy.restore()
        view = cluster.wait_run(run_id, timeout_s=300)

        # Assert
        assert view.state == "completed"
        for r in view.rounds:
            assert sorted(d.worker for d in r.deltas if d.status == "aggregated") == ["w0", "w1"]
        cluster.check_oracle()
    finally:
        proxy.close()
        cluster.stop_all()


def test_a_silent_network_is_noticed_by_the_heartbeat_and_survived(
    tmp_path: Path, own_node: devbroker.DevNode
):
    # Prepare
    cluster = make_cluster(tmp_path, own_node)
    proxy = TcpProxy(own_node.port)
    try:
        run_id = _start_behind_a_proxy(cluster, own_node, proxy)

        # Execute: nothing passes between w0 and the broker, nothing is closed, until w0's own
        # heartbeat check (2 s heartbeat; pika checks every 7 s) declares the task consumer's
        # connection dead. Each connection's check runs on its own clock: the route is restored
        # only once the task consumer's has fired (restored earlier, its connection would see the
        # broker's held reset instead).
        proxy.blackhole()
        cluster.wait_for(
            "w0's heartbeat to give up on its task consumer's connection",
            lambda: any(_lost_by_heartbeat(line) for line in cluster.log("w0").splitlines()),
            timeout_s=90,
        )
        proxy.restore()
        view = cluster.wait_run(run_id, timeout_s=300)

        # Assert: the task consumer's connection was dropped by the heartbeat and opened again;
        # the run completed with one delta per worker per round.
        log = cluster.log("w0")
        assert any(_lost_by_heartbeat(line) for line in log.splitlines()), log[-4000:]
        assert log.count("consuming fedmq.tasks.w0") >= 2
        assert view.state == "completed"
        for r in view.rounds:
            assert sorted(d.worker for d in r.deltas if d.status == "aggregated") == ["w0", "w1"]
        cluster.check_oracle()
    finally:
        proxy.close()
        cluster.stop_all()


def _lost_by_heartbeat(line: str) -> bool:
    """A log line of w0's task consumer saying its connection was lost to missed heartbeats."""
    return "fedmq.tasks.w0: connection lost" in line and "missed heartbeats" in line
