"""Key files for envelope signing: the coordinator's Ed25519 private key and its public key.

- Private key: PKCS8 PEM, created atomically with mode 0600, never silently replaced. It is encrypted
  when ``FEDMQ_KEY_PASSPHRASE`` is set (and that variable is then needed to load it). Loading refuses
  a private key that group or others can read, as ssh does, and says which ``chmod`` fixes it.
- Public key: SubjectPublicKeyInfo PEM; it is what workers are given to trust.

Every failure (missing, unreadable, corrupt, not Ed25519, wrong passphrase, already exists) is a
:class:`~common.errors.KeyFileError` whose message names the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import KeyFileError
from common.signing import key_id

logger = logging.getLogger(__name__)

PRIVATE_KEY_NAME: Final = "coordinator.key"
PUBLIC_KEY_NAME: Final = "coordinator.pub"
PASSPHRASE_ENV: Final = "FEDMQ_KEY_PASSPHRASE"


def generate_key() -> Ed25519PrivateKey:
    """A new Ed25519 private key."""
    return Ed25519PrivateKey.generate()


@dataclasses.dataclass(frozen=True)
class KeyPairFiles:
    """Where a key pair lives, and its key id."""

    private_path: Path
    public_path: Path
    key_id: str


def key_pair_paths(directory: Path) -> tuple[Path, Path]:
    """The (private, public) key file paths inside a keys directory."""
    return directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME


def write_key_pair(directory: Path, *, force: bool = False) -> KeyPairFiles:
    """Generate a key pair into ``directory`` (created with mode 0700 if missing).

    Raises KeyFileError if either file exists and ``force`` is False; nothing is written then.
    """
    private_path, public_path = key_pair_paths(directory)
    if not force:
        for path in (private_path, public_path):
            if path.exists():
                raise KeyFileError(f"{path} already exists; pass --force to replace it")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create the key directory {directory}: {exc.strerror}") from None
    key = generate_key()
    write_private_key(private_path, key, force=force)
    write_public_key(public_path, key.public_key(), force=force)
    return KeyPairFiles(private_path, public_path, key_id(key.public_key()))


def write_private_key(
    path: Path, key: Ed25519PrivateKey, *, force: bool = False, passphrase: bytes | None = None
) -> None:
    """Write ``key`` as PKCS8 PEM with mode 0600, atomically.

    Encrypted with ``passphrase``, or with ``FEDMQ_KEY_PASSPHRASE`` when that is set and no
    passphrase is given. Refuses to replace an existing file unless ``force``.
    """
    secret = passphrase if passphrase is not None else _env_passphrase()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    _write_atomically(path, pem, force=force)
    logger.info("wrote private key %s (%s)", path, "encrypted" if secret else "unencrypted")


def write_public_key(path: Path, key: Ed25519PublicKey, *, force: bool = False) -> None:
    """Write ``key`` as SubjectPublicKeyInfo PEM, atomically; refuses to replace a file unless ``force``."""
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_atomically(path, pem, force=force, mode=0o644)
    logger.info("wrote public key %s (key id %s)", path, key_id(key))


def load_private_key(path: Path, *, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Read an Ed25519 private key; refuse one that group or others can read (as ssh does).

    An encrypted key needs ``passphrase`` or ``FEDMQ_KEY_PASSPHRASE``. Every failure is a
    KeyFileError naming the path.
    """
    pem, mode = _read(path, "private key")
    if os.name == "posix" and mode & 0o077:
        raise KeyFileError(
            f"private key {path} is accessible by group or others (mode {mode:04o}); run `chmod 600 {path}`"
        )
    secret = passphrase if passphrase is not None else _env_passphrase()
    encrypted = pem.lstrip().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    if encrypted and not secret:
        raise KeyFileError(f"private key {path} is encrypted; set {PASSPHRASE_ENV}")
    try:
        key = serialization.load_pem_private_key(pem, password=secret if encrypted else None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        hint = f" or the {PASSPHRASE_ENV} passphrase is wrong" if encrypted else ""
        raise KeyFileError(f"{path} is not a valid PEM private key{hint}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, fedmq signs with Ed25519 keys")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key (SubjectPublicKeyInfo PEM); KeyFileError naming the path otherwise."""
    pem, _mode = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path} is not a valid PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, fedmq verifies with Ed25519 keys")
    return key


def _env_passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def _read(path: Path, what: str) -> tuple[bytes, int]:
    """The file's bytes and its permission bits, taken from the same open file."""
    try:
        with path.open("rb") as file:
            return file.read(), stat.S_IMODE(os.fstat(file.fileno()).st_mode)
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None


def _write_atomically(path: Path, content: bytes, *, force: bool, mode: int = 0o600) -> None:
    """Write a temp file (created 0600, then chmod ``mode``) beside ``path`` and move it into place.

    Without ``force`` the move is a hard link, which fails rather than replace a file that appeared
    meanwhile (on a file system without hard links: a check, then a rename).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            os.fchmod(fd, mode)
            file.write(content)
            file.flush()
            os.fsync(fd)
        if force:
            os.replace(tmp, path)
        else:
            _link_or_rename(tmp, path)
        _fsync_directory(path.parent)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; pass --force to replace it") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _link_or_rename(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``, raising FileExistsError rather than replace a file."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
