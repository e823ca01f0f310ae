"""A private RabbitMQ node for development and tests, in a project-local directory on its own ports.

Contract: :func:`start` brings up Debian's ``rabbitmq-server`` with everything it writes (mnesia,
logs, feature flags, plugins, config) under one directory, listening on 127.0.0.1 only, with
``max_message_size = 16777216`` so that what passes here passes on RabbitMQ 4.x. It returns a
:class:`DevNode` describing the node (and saves it as ``node.json`` in the directory), so
:func:`status`, :func:`stop` and :func:`rabbitmqctl` find it again from the directory alone. Starting
a directory whose node is already running returns the running node.

Run as root, Debian's wrapper scripts switch to the ``rabbitmq`` user, so the directory is chowned to
that user; run as another user, the server scripts are called directly. A missing ``rabbitmq-server``
is a :class:`~common.errors.DevBrokerError` naming the Debian package to install.

File handles: RabbitMQ 3.10 budgets its file handles from the soft ``RLIMIT_NOFILE`` (1024 gives
about 927), and quorum queues and AMQP connections draw from that budget. Debian's wrapper switches
to the ``rabbitmq`` user through ``su``, whose PAM session resets the soft limit to 1024: with about
100 workers (four quorum queues each) the budget runs out and the node stops completing AMQP
handshakes. Every node started here gets an env file (:data:`ENV_FILE`, named by
``RABBITMQ_CONF_ENV_FILE`` and sourced by RabbitMQ's scripts as the node's user) that raises the soft
limit to the hard one.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import DevBrokerError
from common.ports import free_port as free_port

logger = logging.getLogger(__name__)

NODE_FILE = "node.json"
ENV_FILE = "rabbitmq-env.conf"
# Sourced by RabbitMQ's start scripts (POSIX sh) after `su`: the soft open-files limit up to the hard one.
RAISE_FILE_LIMIT = 'ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true\n'
# The node shares its cores with the coordinator and workers on a development machine: Erlang's
# schedulers must not spin waiting for work (RabbitMQ's runtime guide, "scheduler busy waiting").
NO_BUSY_WAIT = 'SERVER_ADDITIONAL_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none"\n'
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
_SBIN = Path("/usr/sbin")
_LIBBIN = Path("/usr/lib/rabbitmq/bin")
_INSTALL_HINT = "install Debian's package: apt-get install -y rabbitmq-server"


@dataclass(frozen=True)
class DevNode:
    """A private node: where it lives, its Erlang node name and its ports."""

    directory: str
    nodename: str
    port: int
    dist_port: int
    pid: int = 0
    tls_port: int = 0

    @property
    def amqp_url(self) -> str:
        """The URL clients use (the node's default ``guest`` user, allowed from loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def amqps_url(self) -> str | None:
        """The TLS URL when the node was started with TLS files, else ``None``."""
        return f"amqps://guest:guest@127.0.0.1:{self.tls_port}/%2F" if self.tls_port else None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS listener: the CA that signs client certificates, the server's pair."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _script(name: str) -> str:
    """Path of a RabbitMQ script: the root wrapper in /usr/sbin, or the real script otherwise."""
    candidates = [_SBIN / name, _LIBBIN / name] if _running_as_root() else [_LIBBIN / name, _SBIN / name]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise DevBrokerError(f"{name} not found: {_INSTALL_HINT}")
    return found


def _node_env(node: DevNode) -> dict[str, str]:
    base = Path(node.directory)
    env = dict(os.environ)
    env.update(
        {
            "RABBITMQ_NODENAME": node.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(base / "mnesia" / "feature_flags"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "mnesia" / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_PID_FILE": str(base / "mnesia" / "node.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(base / ENV_FILE),
        }
    )
    return env


def _tls_config(node: DevNode, tls: TlsFiles) -> str:
    """Copy the TLS files into the node directory; return the rabbitmq.conf lines using them."""
    target = Path(node.directory) / "tls"
    target.mkdir(exist_ok=True)
    names = {"cacertfile": tls.ca_file, "certfile": tls.cert_file, "keyfile": tls.key_file}
    lines = [f"listeners.ssl.default = 127.0.0.1:{node.tls_port}"]
    for key, source in names.items():
        copy = target / f"{key}.pem"
        shutil.copyfile(source, copy)
        lines.append(f"ssl_options.{key} = {copy}")
    lines += ["ssl_options.verify = verify_peer", "ssl_options.fail_if_no_peer_cert = false"]
    return "\n".join(lines) + "\n"


def _write_layout(node: DevNode, tls: TlsFiles | None) -> None:
    base = Path(node.directory)
    for sub in ("mnesia", "log"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    conf = f"max_message_size = {MAX_MESSAGE_SIZE}\nloopback_users.guest = true\nlog.console = false\n"
    if tls is not None:
        conf += _tls_config(node, tls)
    (base / "rabbitmq.conf").write_text(conf)
    (base / ENV_FILE).write_text(RAISE_FILE_LIMIT + NO_BUSY_WAIT)
    plugins = base / "mnesia" / "plugins"
    if not plugins.exists():
        plugins.write_text("[].\n")
    if _running_as_root():
        try:
            entry = pwd.getpwnam("rabbitmq")
        except KeyError as exc:
            raise DevBrokerError(f"no 'rabbitmq' user on this machine: {_INSTALL_HINT}") from exc
        for path in [base, *base.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        probe = subprocess.run(
            ["su", "rabbitmq", "-s", "/bin/sh", "-c", f"test -w '{base / 'mnesia'}'"], check=False
        )
        if probe.returncode != 0:
            raise DevBrokerError(
                f"the rabbitmq user cannot write {base}: every parent directory must be traversable "
                "by it (use a directory outside private temp dirs)"
            )


def _load(directory: Path) -> DevNode | None:
    try:
        data = json.loads((directory / NODE_FILE).read_text())
        return DevNode(**data)
    except (OSError, ValueError, TypeError):
        return None


def _save(node: DevNode) -> None:
    (Path(node.directory) / NODE_FILE).write_text(json.dumps(asdict(node), indent=2) + "\n")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def rabbitmqctl(node: DevNode, *args: str, timeout: float = 60.0) -> str:
    """Run ``rabbitmqctl -n NODE ARGS`` against the node and return its output.

    Raises :class:`DevBrokerError` with rabbitmqctl's own message when the command fails.
    """
    cmd = [_script("rabbitmqctl"), "-q", "-n", node.nodename, *args]
    try:
        done = subprocess.run(
            cmd, env=_node_env(node), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise DevBrokerError(f"rabbitmqctl {' '.join(args)} timed out after {timeout:.0f} s") from exc
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise DevBrokerError(f"rabbitmqctl {' '.join(args)} failed: {' '.join(message)[:500]}")
    return done.stdout


def is_running(node: DevNode) -> bool:
    """True when the node's AMQP port accepts connections and rabbitmqctl reports the app running."""
    if not _port_open(node.port):
        return False
    try:
        rabbitmqctl(node, "await_startup", "--timeout", "5", timeout=20)
    except DevBrokerError:
        return False
    return True


def status(directory: str | Path) -> DevNode | None:
    """The node recorded in ``directory`` if it is running, else ``None``."""
    node = _load(Path(directory).resolve())
    if node is None or not is_running(node):
        return None
    return node


def start(
    directory: str | Path,
    port: int | None = None,
    timeout: float = 90.0,
    tls: TlsFiles | None = None,
    tls_port: int | None = None,
) -> DevNode:
    """Start (or find running) a private node in ``directory``; wait until it accepts clients.

    ``port`` is the AMQP port (a free one when ``None``); the Erlang distribution port is another
    free port. With ``tls``, the node also listens for AMQPS on ``tls_port`` (a free one when
    ``None``), verifying client certificates against ``tls.ca_file`` when a client presents one.
    A directory that held a node before keeps its node name (so its data) and, when free, its port.
    The node keeps running after this process exits; stop it with :func:`stop`.
    """
    base = Path(directory).resolve()
    running = status(base)
    if running is not None:
        if port is not None and port != running.port:
            raise DevBrokerError(f"a node already runs in {base} on port {running.port}, not {port}")
        return running
    _script("rabbitmq-server")  # not installed: say so before anything is written
    prior = _load(base)
    if port is not None:
        amqp_port = port
    elif prior is not None and not _port_open(prior.port):
        amqp_port = prior.port  # same URL as last time
    else:
        amqp_port = free_port()
    if _port_open(amqp_port):
        raise DevBrokerError(f"port {amqp_port} is already in use")
    node = DevNode(
        directory=str(base),
        nodename=prior.nodename if prior is not None else f"fedmq-{amqp_port}@localhost",
        port=amqp_port,
        dist_port=free_port(),
        tls_port=0 if tls is None else (tls_port or free_port()),
    )
    base.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    reason = ""
    for attempt in range(1, _BOOT_ATTEMPTS + 1):
        _write_layout(node, tls)
        try:
            return _boot(node, deadline)
        except _DistPortTakenError as exc:
            # Another process took the distribution port between free_port() and the node's bind.
            reason = str(exc)
            logger.warning(
                "distribution port %d was taken (attempt %d); trying another", node.dist_port, attempt
            )
            node = DevNode(**{**asdict(node), "dist_port": free_port(), "pid": None})
    raise DevBrokerError(
        f"RabbitMQ node did not start: its distribution port was in use at each of {_BOOT_ATTEMPTS} "
        f"attempt(s) ({reason}); see {base / 'startup.log'}"
    )


class _DistPortTakenError(Exception):
    """The node exited at boot because its Erlang distribution port was in use."""


_BOOT_ATTEMPTS = 3
_DIST_PORT_TAKEN = "dist_port_already_used"


def _boot_failure(log_path: Path, offset: int) -> str:
    """The reason the node gave for exiting at boot, from what it wrote to ``log_path`` after ``offset``."""
    try:
        with open(log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", "replace")
    except OSError:
        return ""
    for line in reversed(text.splitlines()):
        if line.startswith(("Kernel pid terminated", "ERROR:", "BOOT FAILED")):
            return line.strip()[:500]
    return ""


def _boot(node: DevNode, deadline: float) -> DevNode:
    """Start ``node``'s server and wait until it accepts clients (or raise with the reason it gave)."""
    base = Path(node.directory)
    log_path = base / "startup.log"
    logger.info("starting RabbitMQ node %s on port %d in %s", node.nodename, node.port, base)
    with open(log_path, "ab") as log:
        offset = log.tell()
        proc = subprocess.Popen(
            [_script("rabbitmq-server")],
            env=_node_env(node),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(base),
            start_new_session=True,
        )
    node = DevNode(**{**asdict(node), "pid": proc.pid})
    _save(node)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            reason = _boot_failure(log_path, offset)
            if _DIST_PORT_TAKEN in reason:
                raise _DistPortTakenError(reason)
            said = f": {reason}" if reason else ""
            raise DevBrokerError(
                f"rabbitmq-server exited with code {proc.returncode}{said}; see {log_path} and {base / 'log'}"
            )
        if is_running(node):
            logger.info("RabbitMQ node %s is up at %s", node.nodename, node.amqp_url)
            return node
        time.sleep(0.5)
    _terminate(proc.pid)
    raise DevBrokerError(f"RabbitMQ node did not start in time; see {log_path}")


def _terminate(pid: int) -> None:
    """Kill the process group this module started for a node (its session leader is ``pid``)."""
    try:
        os.killpg(pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


def stop(directory: str | Path, timeout: float = 60.0) -> bool:
    """Stop the node recorded in ``directory``; return False when none was running."""
    base = Path(directory).resolve()
    node = _load(base)
    if node is None:
        return False
    if not _port_open(node.port):
        return False
    try:
        rabbitmqctl(node, "shutdown", timeout=timeout)
    except DevBrokerError as exc:
        logger.warning("graceful shutdown of %s failed (%s); killing it", node.nodename, exc)
        if node.pid:
            _terminate(node.pid)
    deadline = time.monotonic() + timeout
    while _port_open(node.port) and time.monotonic() < deadline:
        time.sleep(0.2)
    if node.pid:
        _reap(node.pid, deadline)
    return True


def _reap(pid: int, deadline: float) -> None:
    """Wait for the server process this module started to exit (and reap it if it is our child)."""
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.2)
    _terminate(pid)
