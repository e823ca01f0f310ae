"""Opening connections to RabbitMQ: URL and TLS options, heartbeat, capped-backoff reconnect.

pika's :class:`~pika.BlockingConnection` is not thread-safe: every thread that talks to RabbitMQ
opens its own connection through :func:`connect` (the consumer and the publisher each own one).
"""

from __future__ import annotations

import functools
import logging
import random
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
from pika.adapters.utils import io_services_utils

from common.broker.config import BrokerConfig
from common.broker.errors import translating_pika_errors
from common.errors import BrokerUnreachableError, ConfigError

logger = logging.getLogger(__name__)

#: Bytes pika asks of one ``recv`` and reads per I/O event. pika's defaults (4 KiB and 100 KiB)
#: suit small messages; a 4 MiB chunk then takes ~1000 ``recv`` calls, each appended to pika's
#: immutable frame buffer (a copy of everything still pending). Measured here: consuming 100 MB
#: in 4 MiB messages took 0.20-0.25 s of CPU with the defaults, 0.09-0.13 s with these.
RECV_BYTES = 256 * 1024
CONSUME_BYTES = 1024 * 1024


def _tune_pika_reads() -> None:
    transport = getattr(io_services_utils, "_AsyncTransportBase", None)
    if transport is None or not hasattr(transport, "_MAX_RECV_BYTES"):
        logger.warning("pika's transport has changed: large bodies are read with its defaults")
        return
    transport._MAX_RECV_BYTES = max(transport._MAX_RECV_BYTES, RECV_BYTES)
    transport._MAX_CONSUME_BYTES = max(getattr(transport, "_MAX_CONSUME_BYTES", 0), CONSUME_BYTES)


_tune_pika_reads()


def _ssl_options(config: BrokerConfig, host: str) -> pika.SSLOptions:
    context = ssl.create_default_context(cafile=config.tls_ca_file)
    if config.tls_cert_file:
        try:
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the AMQP client certificate: {exc}") from exc
    return pika.SSLOptions(context, server_hostname=config.tls_server_hostname or host)


def connection_parameters(config: BrokerConfig, name: str) -> pika.URLParameters:
    """pika parameters for ``config.amqp_url`` with our heartbeat, TLS and a connection name."""
    parts = urlsplit(config.amqp_url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError("amqp_url must start with amqp:// or amqps://")
    try:
        params = pika.URLParameters(config.amqp_url)
    except ValueError as exc:
        raise ConfigError(f"invalid amqp_url: {exc}") from exc
    params.heartbeat = config.heartbeat_s
    params.blocked_connection_timeout = config.blocked_connection_timeout_s
    params.client_properties = {"connection_name": name, "product": "fedmq"}
    if parts.scheme == "amqps":
        params.ssl_options = _ssl_options(config, parts.hostname or "localhost")
    return params


def url_username(config: BrokerConfig) -> str:
    """The user the URL authenticates as (what the broker validates ``user_id`` against)."""
    return unquote(urlsplit(config.amqp_url).username or "guest")


def connect(config: BrokerConfig, name: str) -> pika.BlockingConnection:
    """Open one connection; :class:`BrokerUnreachableError` or :class:`BrokerAccessRefusedError`.

    RabbitMQ blocking the connection (a memory or disk alarm: publishes then wait, for up to
    ``blocked_connection_timeout_s``) and unblocking it are logged, so a stalled publisher says why.
    """
    params = connection_parameters(config, name)
    with translating_pika_errors():
        connection = pika.BlockingConnection(params)
    # On pika's underlying connection: BlockingConnection's own callbacks wait for the next
    # process_data_events, which a publish blocked by the alarm never reaches.
    impl = connection._impl
    impl.add_on_connection_blocked_callback(functools.partial(_on_blocked, name))
    impl.add_on_connection_unblocked_callback(functools.partial(_on_unblocked, name))
    return connection


def _on_blocked(name: str, _connection: object, frame: Any) -> None:
    reason = getattr(getattr(frame, "method", None), "reason", None) or "no reason given"
    logger.warning(
        "%s: RabbitMQ blocks publishing (%s): it raised a resource alarm (memory or disk; "
        "`rabbitmq-diagnostics alarms` on its host); publishes wait until it clears",
        name,
        reason,
    )


def _on_unblocked(name: str, _connection: object, _frame: object) -> None:
    logger.warning("%s: RabbitMQ's resource alarm cleared; publishing resumes", name)


def backoff_delays(initial_s: float, max_s: float) -> Iterator[float]:
    """Doubling delays from ``initial_s`` capped at ``max_s``, each with up to 10 % jitter, forever."""
    delay = initial_s
    while True:
        yield min(delay, max_s) * (1.0 + random.uniform(0.0, 0.1))
        delay = min(delay * 2, max_s)


def connect_with_retry(
    config: BrokerConfig,
    name: str,
    stop: threading.Event | None = None,
    deadline_s: float | None = None,
) -> pika.BlockingConnection | None:
    """Connect, retrying an unreachable broker with capped backoff.

    Gives up by raising the last :class:`BrokerUnreachableError` once ``deadline_s`` has passed;
    returns ``None`` when ``stop`` is set while waiting. Refused credentials are never retried.
    """
    started = time.monotonic()
    for delay in backoff_delays(config.reconnect_initial_s, config.reconnect_max_s):
        try:
            return connect(config, name)
        except BrokerUnreachableError as exc:
            if deadline_s is not None and time.monotonic() - started + delay > deadline_s:
                raise
            logger.warning("%s: RabbitMQ unreachable (%s); retrying in %.1f s", name, exc, delay)
        if stop is not None:
            if stop.wait(delay):
                return None
        else:
            time.sleep(delay)
    return None  # pragma: no cover - the delay generator never ends


def close_quietly(connection: pika.BlockingConnection | None) -> None:
    """Close a connection that may already be broken, ignoring every error."""
    if connection is None:
        return
    try:
        if connection.is_open:
            connection.close()
    except Exception as exc:  # closing a broken connection: nothing useful to report upward
        logger.debug("ignoring error while closing a connection: %r", exc)
