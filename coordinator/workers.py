"""Worker registry: each worker gets its own RabbitMQ user, its own queues, a row in SQL and a config file.

Permissions of a worker's user (DESIGN.md, "Topology"): it configures nothing, writes only to the
results exchange, and reads only its own task and release queues. Every message it publishes
carries its ``user_id``, which RabbitMQ validates and the coordinator checks against this registry.

Users are managed through ``rabbitmqctl`` on the local node started by ``fedmq dev broker`` (the
directory given by ``--broker-dir``); a broker elsewhere needs the same user and permissions made
with its own tooling, then ``fedmq workers add --no-broker-user --password ...``. :func:`add_workers`
adds many workers at once: one ``rabbitmqctl import_definitions`` makes every user with its
permissions (each ``rabbitmqctl`` call costs about a second, however little it does).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from sqlalchemy import select

from common.broker import RabbitmqBroker, broker_config_from_settings, fedmq_topology
from common.broker.topology import (
    DEAD_LETTER_EXCHANGE,
    RESULTS_EXCHANGE,
    worker_release_queue,
    worker_task_queue,
)
from common.errors import AlreadyExistsError, ConfigError, NotFoundError
from common.keyfiles import key_pair_paths
from common.settings import Settings
from coordinator.db.engine import Database
from coordinator.db.models import Worker
from worker.config import WorkerConfig

if TYPE_CHECKING:
    from common.devbroker import DevNode

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def check_worker_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(
            f"worker name {name!r}: use 1-63 letters, digits, '-' or '_' (it names queues and a broker user)"
        )
    return name


def worker_permissions(name: str) -> tuple[str, str, str]:
    """(configure, write, read) regular expressions for worker ``name``'s broker user.

    Writing to the dead-letter exchange lets the worker's consumer dead-letter a message it can
    never process *with the reason* (a header); without it the broker still dead-letters the
    rejected message, but the reason stays in the worker's log.
    """
    own = "|".join(re.escape(q) for q in (worker_task_queue(name), worker_release_queue(name)))
    writable = "|".join(re.escape(e) for e in (RESULTS_EXCHANGE, DEAD_LETTER_EXCHANGE))
    return "^$", f"^({writable})$", f"^({own})$"


def vhost_of(amqp_url: str) -> str:
    """The virtual host an AMQP URL names (``/`` when it names none)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def worker_amqp_url(base_url: str, name: str, password: str) -> str:
    """``base_url`` with the worker's credentials in place of the admin's."""
    parts = urlsplit(base_url)
    host = parts.hostname or "localhost"
    netloc = f"{quote(name, safe='')}:{quote(password, safe='')}@{host}" + (
        f":{parts.port}" if parts.port else ""
    )
    return urlunsplit((parts.scheme, netloc, parts.path or "/%2F", parts.query, ""))


@dataclass(frozen=True)
class AddedWorker:
    name: str
    config_path: Path
    amqp_url: str


def add_worker(
    settings: Settings,
    db: Database,
    name: str,
    config_path: Path,
    *,
    broker_dir: Path | None,
    password: str | None = None,
    data: str | None = None,
    threads: int | None = None,
) -> AddedWorker:
    """Create the broker user (via the dev node in ``broker_dir``), queues, SQL row and config file
    (``threads``: the CPU threads its model code may use, written into the config)."""
    public_path = _check_new_workers(settings, db, [name])
    password = password or _new_password()
    if broker_dir is not None:
        from common.broker import admin

        node = _dev_node(broker_dir)
        admin.add_user(node, name, password)
        admin.set_permissions(node, name, *worker_permissions(name), vhost=vhost_of(settings.amqp_url))
    _declare_worker_queues(settings, [name])
    (added,) = _record_workers(settings, db, public_path, [(name, password, config_path, data)], threads)
    return added


def add_workers(
    settings: Settings, db: Database, names: Sequence[str], config_dir: Path, *, broker_dir: Path | None
) -> list[AddedWorker]:
    """:func:`add_worker` for many workers at once, each config in ``config_dir/NAME.toml``.

    Each worker still gets its own broker user with :func:`worker_permissions` (made by one
    definitions import on the dev node in ``broker_dir``), its queues (one declaration), its SQL
    row (one transaction) and its config file.
    """
    public_path = _check_new_workers(settings, db, names)
    passwords = {name: _new_password() for name in names}
    if broker_dir is not None:
        import_worker_users(_dev_node(broker_dir), passwords, vhost=vhost_of(settings.amqp_url))
    _declare_worker_queues(settings, names)
    entries = [(name, passwords[name], config_dir / f"{name}.toml", None) for name in names]
    return _record_workers(settings, db, public_path, entries)


def rabbitmq_password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256`` form: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def import_worker_users(node: DevNode, passwords: dict[str, str], vhost: str = "/") -> None:
    """Create (or reset) one broker user per worker with its permissions, in one definitions import."""
    from common.devbroker import rabbitmqctl

    definitions = {
        "users": [
            {
                "name": name,
                "password_hash": rabbitmq_password_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
            for name, password in passwords.items()
        ],
        "permissions": [_permission_definition(name, vhost) for name in passwords],
    }
    # rabbitmqctl reads the file as the node's user (Debian's wrapper switches to it when run as
    # root): the file is that user's alone, and removed at once.
    fd, path = tempfile.mkstemp(prefix="workers-", suffix=".json", dir=node.directory)
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(definitions, file)
        if os.geteuid() == 0:
            owner = Path(node.directory).stat()
            os.chown(path, owner.st_uid, owner.st_gid)
        rabbitmqctl(node, "import_definitions", path)
    finally:
        os.unlink(path)
    logger.info("%d RabbitMQ worker users ready on %s", len(passwords), node.nodename)


def _permission_definition(name: str, vhost: str) -> dict[str, str]:
    configure, write, read = worker_permissions(name)
    return {"user": name, "vhost": vhost, "configure": configure, "write": write, "read": read}


def _new_password() -> str:
    return secrets.token_hex(24)  # hex: never starts with "-" (rabbitmqctl would read an option)


def _dev_node(broker_dir: Path) -> DevNode:
    from common.devbroker import status

    node = status(broker_dir)
    if node is None:
        raise ConfigError(f"no RabbitMQ node running in {broker_dir}: start it with `fedmq dev broker start`")
    return node


def _check_new_workers(settings: Settings, db: Database, names: Sequence[str]) -> Path:
    """Refuse bad or already active names and a missing coordinator key; the public key's path."""
    for name in names:
        check_worker_name(name)
    _, public_path = key_pair_paths(settings.keys_dir)
    if not public_path.exists():
        raise ConfigError(f"no coordinator key at {public_path}: run `fedmq keys generate` first")
    with db.session() as session:
        active = list(
            session.scalars(select(Worker.name).where(Worker.name.in_(names), Worker.status == "active"))
        )
    if active:
        raise AlreadyExistsError(
            f"worker {', '.join(repr(n) for n in sorted(active))} already exists (revoke it first to re-add it)"
        )
    return public_path


def _declare_worker_queues(settings: Settings, names: Sequence[str]) -> None:
    broker = RabbitmqBroker(broker_config_from_settings(settings), name="fedmq-admin", connect_deadline_s=10)
    try:
        broker.declare(fedmq_topology(tuple(names)))
    finally:
        broker.close()


def _record_workers(
    settings: Settings,
    db: Database,
    public_path: Path,
    entries: Sequence[tuple[str, str, Path, str | None]],
    threads: int | None = None,
) -> list[AddedWorker]:
    """The SQL rows (one transaction) and config files of (name, password, config path, data) entries."""
    with db.session(write=True) as session:
        rows = {
            w.name: w for w in session.scalars(select(Worker).where(Worker.name.in_([e[0] for e in entries])))
        }
        for name, password, _, _ in entries:
            fingerprint = hashlib.sha256(f"{name}:{password}".encode()).hexdigest()
            row = rows.get(name)
            if row is None:
                session.add(Worker(name=name, credentials_fingerprint=fingerprint, status="active"))
            else:
                row.status, row.credentials_fingerprint = "active", fingerprint
    public_key = public_path.read_text()
    added = []
    for name, password, config_path, data in entries:
        url = worker_amqp_url(settings.amqp_url, name, password)
        WorkerConfig(
            name=name,
            amqp_url=url,
            coordinator_public_key=public_key,
            data=data,
            amqp_heartbeat_s=settings.amqp_heartbeat_s,
            tls_ca_file=settings.amqp_tls_ca_file,
            threads=threads,
        ).write(config_path)
        logger.info("worker %s added; config in %s", name, config_path)
        added.append(AddedWorker(name, config_path, url))
    return added


def revoke_worker(db: Database, name: str, *, broker_dir: Path | None) -> None:
    """Mark the worker revoked (its deltas are refused from now on) and delete its broker user."""
    with db.session(write=True) as session:
        row = session.scalar(select(Worker).where(Worker.name == name))
        if row is None:
            raise NotFoundError(f"worker {name!r} does not exist")
        row.status = "revoked"
    if broker_dir is not None:
        from common.broker import admin
        from common.devbroker import status

        node = status(broker_dir)
        if node is not None:
            admin.delete_user(node, name)


def list_workers(db: Database) -> list[Worker]:
    with db.session() as session:
        return list(session.scalars(select(Worker).order_by(Worker.name)))
