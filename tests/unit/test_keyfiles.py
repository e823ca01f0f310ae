"""Key files: a private key is created 0600, never silently replaced, refused when others can read it."""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.errors import KeyFileError
from common.keyfiles import (
    PASSPHRASE_ENV,
    generate_key,
    load_private_key,
    load_public_key,
    write_key_pair,
    write_private_key,
)
from common.signing import KIND_MODEL_CODE, key_id, open_envelope, seal


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def _no_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that would leave new files world-readable (and writable), as on a careless machine."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_key_pair_files_have_safe_modes_and_sign_and_verify(tmp_path: Path, open_umask: None) -> None:
    # Prepare
    directory = tmp_path / "keys"

    # Execute
    files = write_key_pair(directory)

    # Assert
    assert _mode(files.private_path) == 0o600
    assert _mode(files.public_path) == 0o644
    assert _mode(directory) == 0o700
    private, public = load_private_key(files.private_path), load_public_key(files.public_path)
    assert key_id(public) == key_id(private.public_key()) == files.key_id
    envelope = seal(b"payload", key=private, kind=KIND_MODEL_CODE, model_id="m", version=1)
    assert bytes(open_envelope(envelope, public)[1]) == b"payload"
    assert sorted(p.name for p in directory.iterdir()) == ["coordinator.key", "coordinator.pub"]


def test_existing_key_pair_is_not_replaced_without_force(tmp_path: Path) -> None:
    # Prepare
    first = write_key_pair(tmp_path)
    before = first.private_path.read_bytes(), first.public_path.read_bytes()

    # Execute
    with pytest.raises(KeyFileError, match="already exists; pass --force") as raised:
        write_key_pair(tmp_path)

    # Assert
    assert str(first.private_path) in str(raised.value)
    assert (first.private_path.read_bytes(), first.public_path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coordinator.key", "coordinator.pub"]


def test_lone_public_key_blocks_generation_without_force(tmp_path: Path) -> None:
    (tmp_path / "coordinator.pub").write_bytes(b"someone's key")
    with pytest.raises(KeyFileError, match=re.escape("coordinator.pub already exists")):
        write_key_pair(tmp_path)
    assert not (tmp_path / "coordinator.key").exists()


def test_force_replaces_the_key_pair(tmp_path: Path) -> None:
    # Prepare
    first = write_key_pair(tmp_path)

    # Execute
    second = write_key_pair(tmp_path, force=True)

    # Assert
    assert second.key_id != first.key_id
    assert key_id(load_public_key(second.public_path)) == second.key_id
    assert _mode(second.private_path) == 0o600


def test_write_private_key_refuses_existing_file_without_force(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(b"keep me")
    with pytest.raises(KeyFileError, match="already exists"):
        write_private_key(path, generate_key())
    assert path.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_private_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    # Prepare
    files = write_key_pair(tmp_path)
    files.private_path.chmod(mode)

    # Execute / Assert
    with pytest.raises(KeyFileError) as raised:
        load_private_key(files.private_path)
    assert f"chmod 600 {files.private_path}" in str(raised.value)


def test_private_key_with_owner_only_mode_0400_loads(tmp_path: Path) -> None:
    files = write_key_pair(tmp_path)
    files.private_path.chmod(0o400)
    assert key_id(load_private_key(files.private_path).public_key()) == files.key_id


@pytest.mark.parametrize(
    "content",
    [b"", b"not a key\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", b"\xff\xfe"],
    ids=["empty", "text", "bad-pem", "binary"],
)
def test_corrupt_key_files_raise_key_file_error_naming_the_path(tmp_path: Path, content: bytes) -> None:
    # Prepare
    private, public = tmp_path / "bad.key", tmp_path / "bad.pub"
    for path in (private, public):
        path.write_bytes(content)
        path.chmod(0o600)

    # Execute / Assert
    with pytest.raises(KeyFileError, match=re.escape(str(private))):
        load_private_key(private)
    with pytest.raises(KeyFileError, match=re.escape(str(public))):
        load_public_key(public)


def test_missing_key_files_raise_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=re.escape("nope.key")):
        load_private_key(tmp_path / "nope.key")
    with pytest.raises(KeyFileError, match=re.escape("nope.pub")):
        load_public_key(tmp_path / "nope.pub")


def test_keys_of_another_algorithm_are_refused(tmp_path: Path) -> None:
    # Prepare
    other = X25519PrivateKey.generate()
    private, public = tmp_path / "x.key", tmp_path / "x.pub"
    private.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        other.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )

    # Execute / Assert
    with pytest.raises(KeyFileError, match="Ed25519"):
        load_private_key(private)
    with pytest.raises(KeyFileError, match="Ed25519"):
        load_public_key(public)


def test_passphrase_from_environment_encrypts_the_private_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")

    # Execute
    files = write_key_pair(tmp_path)

    # Assert
    assert b"ENCRYPTED PRIVATE KEY" in files.private_path.read_bytes()
    assert key_id(load_private_key(files.private_path).public_key()) == files.key_id
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong horse")
    with pytest.raises(KeyFileError, match="passphrase is wrong"):
        load_private_key(files.private_path)
    monkeypatch.delenv(PASSPHRASE_ENV)
    with pytest.raises(KeyFileError, match=f"encrypted; set {PASSPHRASE_ENV}"):
        load_private_key(files.private_path)


def test_unencrypted_key_loads_even_when_a_passphrase_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_key_pair(tmp_path)
    monkeypatch.setenv(PASSPHRASE_ENV, "unused")
    assert key_id(load_private_key(files.private_path).public_key()) == files.key_id


def test_key_files_are_written_on_file_systems_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    def no_links(*_args: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)

    # Execute
    files = write_key_pair(tmp_path)

    # Assert
    assert _mode(files.private_path) == 0o600
    assert key_id(load_private_key(files.private_path).public_key()) == files.key_id
    with pytest.raises(KeyFileError, match="already exists"):
        write_private_key(files.private_path, generate_key())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coordinator.key", "coordinator.pub"]
