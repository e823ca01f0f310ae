"""One typed settings object for every fedmq process and command.

Values come from, in increasing priority:

1. the defaults below (good for a developer's machine);
2. an optional TOML config file: the path in ``FEDMQ_CONFIG_FILE``, else ``./fedmq.toml`` when it
   exists; keys are the field names (``database_url = "..."``), optionally under a ``[fedmq]`` table;
3. environment variables ``FEDMQ_<FIELD>`` (``FEDMQ_DATABASE_URL``, ``FEDMQ_KEYS_DIR``, ...).

:func:`load_settings` validates everything at start-up and raises :class:`~common.errors.ConfigError`
with one clear line naming the source of a bad value. Outside ``environment = "development"`` it refuses
default secrets (the ``guest`` RabbitMQ account).

The object is frozen: a command loads it once and passes it down (``dataclasses.replace`` for a
command-line override).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common.errors import ConfigError

ENV_PREFIX = "FEDMQ_"
CONFIG_FILE_ENV = "FEDMQ_CONFIG_FILE"
DEFAULT_CONFIG_FILE = "fedmq.toml"
ENVIRONMENTS = ("development", "test", "production")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Validated settings; build with :func:`load_settings` (or directly in tests)."""

    environment: str = "development"
    """``development``, ``test`` or ``production`` (production refuses default secrets)."""

    database_url: str = "sqlite:///fedmq.db"
    """SQLAlchemy URL: ``sqlite:///path`` (default: ``fedmq.db`` in the working directory) or
    ``postgresql://user:password@host:port/db`` (driver psycopg 3)."""

    db_busy_timeout_s: float = 10.0
    """How long a write waits for another writer's lock (SQLite busy timeout, PostgreSQL lock timeout)."""

    db_connect_timeout_s: float = 5.0
    """How long to wait for a database server before giving up with a clear error."""

    keys_dir: Path = field(default_factory=lambda: Path(".fedmq") / "keys")
    """Directory holding ``coordinator.key`` / ``coordinator.pub``."""

    amqp_url: str = "amqp://guest:guest@localhost:5672/%2F"
    """RabbitMQ URL (``amqps://`` for TLS)."""

    chunk_size: int = 4 * _MIB
    """Bodies larger than this travel as chunks (keep well below RabbitMQ 4's 16 MiB limit)."""

    amqp_heartbeat_s: int = 30
    """AMQP heartbeat: a connection silent this long (twice, by RabbitMQ's rule) counts as dead."""

    amqp_tls_ca_file: str | None = None
    """CA bundle that verifies the broker's certificate (``amqps://``)."""

    amqp_tls_cert_file: str | None = None
    """Client certificate for ``amqps://`` (with ``amqp_tls_key_file``), when the broker asks for one."""

    amqp_tls_key_file: str | None = None

    max_model_bytes: int = 2048 * _MIB
    """Largest weight frame accepted from the outside (codec limit)."""

    log_level: str = "WARNING"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _validate(s: Settings) -> None:
    if s.environment not in ENVIRONMENTS:
        raise ConfigError(f"environment must be one of {', '.join(ENVIRONMENTS)}, not {s.environment!r}")
    if s.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {s.log_level!r}")
    scheme = s.database_url.split(":", 1)[0].split("+", 1)[0]
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise ConfigError(
            f"database_url must start with sqlite:/// or postgresql://, not {redact_url(s.database_url)!r}"
        )
    if urlsplit(s.amqp_url).scheme not in ("amqp", "amqps"):
        raise ConfigError(f"amqp_url must start with amqp:// or amqps://, not {redact_url(s.amqp_url)!r}")
    for name in ("db_busy_timeout_s", "db_connect_timeout_s"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name} must be positive")
    if not 64 * 1024 <= s.chunk_size <= 16 * _MIB - 64 * 1024:
        raise ConfigError("chunk_size must be between 64 KiB and just under 16 MiB (RabbitMQ 4's limit)")
    if s.amqp_heartbeat_s < 0:
        raise ConfigError("amqp_heartbeat_s must be >= 0 (0 turns heartbeats off)")
    if s.max_model_bytes <= 0:
        raise ConfigError("max_model_bytes must be positive")
    if s.environment == "production" and urlsplit(s.amqp_url).password == "guest":
        raise ConfigError("amqp_url uses the default guest password: set FEDMQ_AMQP_URL for production")


def redact_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_KIND_NAMES = {"int": "an integer", "float": "a number", "Path": "a path", "str": "a string"}


def _coerce(name: str, raw: Any, source: str) -> Any:
    """Convert one raw value (a string from the environment, or a TOML value) to the field's type."""
    kind = str(_FIELDS[name].type)
    try:
        if kind == "Path":
            if not isinstance(raw, str | Path):
                raise TypeError
            return Path(raw).expanduser()
        if kind == "int":
            if isinstance(raw, bool):
                raise TypeError
            return int(raw)
        if kind == "float":
            if isinstance(raw, bool):
                raise TypeError
            return float(raw)
        if not isinstance(raw, str):
            raise TypeError
        return raw.upper() if name == "log_level" else raw
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be {_KIND_NAMES.get(kind, kind)}, got {raw!r}") from None


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    section = data.get("fedmq", data)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: [fedmq] must be a table")
    unknown = sorted(set(section) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return dict(section)


def load_settings(
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    **overrides: Any,
) -> Settings:
    """Build and validate the settings from defaults, config file, environment and ``overrides``.

    ``environ`` defaults to ``os.environ``; ``config_file`` defaults to ``$FEDMQ_CONFIG_FILE`` or
    ``./fedmq.toml`` if present. ``overrides`` (e.g. from command-line options) win over everything;
    ``None`` values in them are ignored. Raises :class:`ConfigError` on any invalid value.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    explicit = config_file or (Path(env[CONFIG_FILE_ENV]) if env.get(CONFIG_FILE_ENV) else None)
    path = explicit or Path(DEFAULT_CONFIG_FILE)
    if explicit is not None or path.is_file():
        for name, raw in _read_config_file(path).items():
            values[name] = _coerce(name, raw, f"config file {path}")
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if env.get(key, "") != "":
            values[name] = _coerce(name, env[key], f"environment variable {key}")
    for name, raw in overrides.items():
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        if raw is not None:
            values[name] = _coerce(name, raw, f"option {name}")
    return Settings(**values)
