"""Worker registry: each worker gets its own RabbitMQ user, its own queues, a row in SQL and a config file.

Permissions of a worker's user (DESIGN.md, "Topology"): it configures nothing, writes only to the
results exchange, and reads only its own task and release queues. Every message it publishes
carries its ``user_id``, which RabbitMQ validates and the coordinator checks against this registry.

Users are managed through ``rabbitmqctl`` on the local node started by ``fedmq dev broker`` (the
directory given by ``--broker-dir``); a broker elsewhere needs the same user and permissions made
with its own tooling, then ``fedmq workers add --no-broker-user --password ...``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
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
) -> AddedWorker:
    """Create the broker user (via the dev node in ``broker_dir``), queues, SQL row and config file."""
    check_worker_name(name)
    _, public_path = key_pair_paths(settings.keys_dir)
    if not public_path.exists():
        raise ConfigError(f"no coordinator key at {public_path}: run `fedmq keys generate` first")
    with db.session() as session:
        existing = session.scalar(select(Worker).where(Worker.name == name))
        if existing is not None and existing.status == "active":
            raise AlreadyExistsError(f"worker {name!r} already exists (revoke it first to re-add it)")
    password = password or secrets.token_hex(
        24
    )  # hex: never starts with "-" (rabbitmqctl would read an option)
    if broker_dir is not None:
        from common.broker import admin
        from common.devbroker import status

        node = status(broker_dir)
        if node is None:
            raise ConfigError(
                f"no RabbitMQ node running in {broker_dir}: start it with `fedmq dev broker start`"
            )
        admin.add_user(node, name, password)
        admin.set_permissions(node, name, *worker_permissions(name), vhost=vhost_of(settings.amqp_url))
    broker = RabbitmqBroker(broker_config_from_settings(settings), name="fedmq-admin", connect_deadline_s=10)
    try:
        broker.declare(fedmq_topology((name,)))
    finally:
        broker.close()
    fingerprint = hashlib.sha256(f"{name}:{password}".encode()).hexdigest()
    with db.session(write=True) as session:
        row = session.scalar(select(Worker).where(Worker.name == name))
        if row is None:
            session.add(Worker(name=name, credentials_fingerprint=fingerprint, status="active"))
        else:
            row.status, row.credentials_fingerprint = "active", fingerprint
    url = worker_amqp_url(settings.amqp_url, name, password)
    WorkerConfig(
        name=name,
        amqp_url=url,
        coordinator_public_key=public_path.read_text(),
        data=data,
        amqp_heartbeat_s=settings.amqp_heartbeat_s,
        tls_ca_file=settings.amqp_tls_ca_file,
    ).write(config_path)
    logger.info("worker %s added; config in %s", name, config_path)
    return AddedWorker(name, config_path, url)


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
