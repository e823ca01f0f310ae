"""Connection and transfer settings of the RabbitMQ layer, and their one mapping from :class:`Settings`.

:class:`BrokerConfig` is what every part of :mod:`common.broker` takes; :func:`broker_config_from_settings`
is the only place that knows how the process-wide settings object spells these values.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError

MIB = 1024 * 1024
RABBITMQ4_MAX_MESSAGE_SIZE = 16 * MIB


@dataclass(frozen=True)
class BrokerConfig:
    """How to reach RabbitMQ and how large bodies travel.

    ``amqp_url`` may carry pika's URL query options (``heartbeat``, ``connection_attempts``...);
    ``heartbeat_s`` set here wins. TLS is used for ``amqps://`` URLs: ``tls_ca_file`` is the CA to
    trust (the system store when ``None``), ``tls_cert_file``/``tls_key_file`` a client certificate.
    """

    amqp_url: str = "amqp://guest:guest@localhost:5672/%2F"
    heartbeat_s: int = 30
    blocked_connection_timeout_s: float = 60.0
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_hostname: str | None = None
    chunk_size: int = 4 * MIB
    max_transfer_size: int = 4096 * MIB
    spill_dir: Path | None = None
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    max_delivery_attempts: int = 5

    def __post_init__(self) -> None:
        if not 1024 <= self.chunk_size <= RABBITMQ4_MAX_MESSAGE_SIZE - 64 * 1024:
            raise ConfigError("chunk_size must be between 1 KiB and just under 16 MiB (RabbitMQ 4's limit)")
        if self.max_delivery_attempts < 1:
            raise ConfigError("max_delivery_attempts must be at least 1")
        if self.reconnect_initial_s <= 0 or self.reconnect_max_s < self.reconnect_initial_s:
            raise ConfigError("reconnect delays must be positive, the cap at least the initial delay")

    def transfers_dir(self, queue: str) -> Path:
        """Where chunked transfers to ``queue`` are reassembled (kept across restarts)."""
        base = (
            self.spill_dir if self.spill_dir is not None else Path(tempfile.gettempdir()) / "fedmq-transfers"
        )
        return base / queue


def broker_config_from_settings(settings: Any, **overrides: Any) -> BrokerConfig:
    """Build a :class:`BrokerConfig` from the settings object (fields it lacks keep their defaults).

    Reads ``amqp_url``, ``chunk_size``, ``amqp_heartbeat_s``, ``amqp_tls_ca_file``,
    ``amqp_tls_cert_file``, ``amqp_tls_key_file`` and ``transfers_dir`` when present.
    """
    names = {
        "amqp_url": "amqp_url",
        "chunk_size": "chunk_size",
        "heartbeat_s": "amqp_heartbeat_s",
        "tls_ca_file": "amqp_tls_ca_file",
        "tls_cert_file": "amqp_tls_cert_file",
        "tls_key_file": "amqp_tls_key_file",
        "spill_dir": "transfers_dir",
    }
    values: dict[str, Any] = {}
    for ours, theirs in names.items():
        value = getattr(settings, theirs, None)
        if value is not None:
            values[ours] = str(value) if ours.startswith("tls_") else value
    if "spill_dir" in values:
        values["spill_dir"] = Path(values["spill_dir"])
    values.update(overrides)
    return BrokerConfig(**values)
