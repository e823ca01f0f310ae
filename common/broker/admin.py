"""Users and permissions on a development node, driven through rabbitmqctl.

Each worker gets its own RabbitMQ user (DESIGN.md, "Topology"): it may read only its own queues and
write only to the results route, and RabbitMQ validates the ``user_id`` on what it publishes. These
functions manage such users on a node started by :mod:`common.devbroker`; a production deployment
does the same through its own tooling or the management API.
"""

from __future__ import annotations

import json
import logging

from common.devbroker import DevNode, rabbitmqctl

logger = logging.getLogger(__name__)


def add_user(node: DevNode, name: str, password: str) -> None:
    """Create user ``name``; an existing user gets ``password`` as its new password."""
    users = list_users(node)
    if name in users:
        rabbitmqctl(node, "change_password", name, password)
    else:
        rabbitmqctl(node, "add_user", name, password)
    logger.info("RabbitMQ user %s ready on %s", name, node.nodename)


def set_permissions(
    node: DevNode, user: str, configure_re: str, write_re: str, read_re: str, vhost: str = "/"
) -> None:
    """Set ``user``'s configure / write / read regular expressions on ``vhost``."""
    rabbitmqctl(node, "set_permissions", "-p", vhost, user, configure_re, write_re, read_re)


def delete_user(node: DevNode, name: str) -> None:
    """Delete user ``name`` (closing nothing: its open connections stay until they reconnect)."""
    if name in list_users(node):
        rabbitmqctl(node, "delete_user", name)


def list_users(node: DevNode) -> list[str]:
    """The node's user names."""
    out = rabbitmqctl(node, "list_users", "--formatter", "json")
    return [entry["user"] for entry in json.loads(out or "[]")]
