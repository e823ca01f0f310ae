"""A worker's configuration file, written by ``fedmq workers add`` (TOML).

It holds the worker's name, its own RabbitMQ URL (with its credentials: the file is written 0600),
the coordinator's public key (PEM, inline, so a worker needs nothing else to verify releases), and
optionally the local data path and the model cache directory.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.broker.config import BrokerConfig
from common.errors import ConfigError

WORKER_CONFIG_KEYS = ("name", "amqp_url", "coordinator_public_key")


# Releases of each model a worker keeps in its cache directory, the newest ones (worker/models.py).
KEEP_VERSIONS = 3


@dataclass(frozen=True)
class WorkerConfig:
    name: str
    amqp_url: str
    coordinator_public_key: str
    data: str | None = None
    cache_dir: str | None = None
    heartbeat_s: float = 15.0
    fetch_timeout_s: float = 60.0
    # How long a task for a newly announced version waits for its broadcast before fetching it.
    broadcast_wait_s: float = 30.0
    amqp_heartbeat_s: int = 30
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # CPU threads the model code may use (BLAS, OpenMP, TensorFlow); None: the libraries' own
    # defaults (every core). See worker/threads.py.
    threads: int | None = None
    # Releases of each model kept in the cache directory, the newest ones (worker/models.py).
    cache_versions: int = KEEP_VERSIONS

    def broker_config(self) -> BrokerConfig:
        """The worker's connection settings (its own user; TLS when the URL is ``amqps://``)."""
        return BrokerConfig(
            amqp_url=self.amqp_url,
            heartbeat_s=self.amqp_heartbeat_s,
            tls_ca_file=self.tls_ca_file,
            tls_cert_file=self.tls_cert_file,
            tls_key_file=self.tls_key_file,
            spill_dir=self.cache_path() / "transfers",
        )

    def public_key(self) -> Ed25519PublicKey:
        try:
            key = serialization.load_pem_public_key(self.coordinator_public_key.encode())
        except ValueError as exc:
            raise ConfigError(f"worker {self.name}: coordinator_public_key is not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"worker {self.name}: coordinator_public_key is not an Ed25519 key")
        return key

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(".fedmq") / "worker-cache" / self.name

    def to_toml(self) -> str:
        lines = [
            "# fedmq worker configuration (keep it private: it holds the worker's broker password)",
            f"name = {_quote(self.name)}",
            f"amqp_url = {_quote(self.amqp_url)}",
            f'coordinator_public_key = """\n{self.coordinator_public_key.strip()}\n"""',
        ]
        if self.data:
            lines.append(f"data = {_quote(self.data)}")
        if self.cache_dir:
            lines.append(f"cache_dir = {_quote(self.cache_dir)}")
        lines.append(f"amqp_heartbeat_s = {int(self.amqp_heartbeat_s)}")
        for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            value = getattr(self, key)
            if value:
                lines.append(f"{key} = {_quote(str(value))}")
        if self.threads is not None:
            lines.append(f"threads = {int(self.threads)}")
        if self.cache_versions != KEEP_VERSIONS:
            lines.append(f"cache_versions = {int(self.cache_versions)}")
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> None:
        """Write the file with mode 0600 (it holds credentials)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_toml())
        os.chmod(path, 0o600)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def load_worker_config(path: str | Path) -> WorkerConfig:
    """Read a worker config file; ConfigError with the path for anything missing or malformed."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the worker config ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    missing = [k for k in WORKER_CONFIG_KEYS if not isinstance(raw.get(k), str) or not raw.get(k)]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)} (write it with `fedmq workers add`)")
    known = {f.name for f in dataclasses.fields(WorkerConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
    threads = raw.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"{path}: threads must be a whole number >= 1, not {threads!r}")
    keep = raw.get("cache_versions", KEEP_VERSIONS)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"{path}: cache_versions must be a whole number >= 1, not {keep!r}")
    config = WorkerConfig(**raw)
    config.public_key()
    return config
