"""Signatures the registry stores: the model code once per model, a manifest once per version.

- Code: ``seal(code bytes, kind="model-code", model_id=<registry name>, version=0)``; the envelope
  carries the code itself, so a worker can verify and then load it.
- Version: the weights frame can be 100 MB, so it is not copied into an envelope. Instead the
  registry seals a small *manifest* (kind ``model-weights``): msgpack of model name, version, parent,
  the weights frame's sha256 and size, and the code's sha256. A holder of the frame checks it with
  :func:`verify_version` (signature first, then the frame's sha256 against the signed manifest).

:class:`Signer` is the seam: :class:`KeySigner` signs with the coordinator's Ed25519 key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import KeyFileError, PayloadMismatchError
from common.keyfiles import key_pair_paths, load_private_key
from common.release import CODE_ENVELOPE_VERSION, KIND_MODEL_WEIGHTS, parse_manifest
from common.settings import Settings
from common.signing import KIND_MODEL_CODE, open_envelope, seal


class Signer(Protocol):
    """Signs payloads for the registry; returns envelope bytes (see :func:`common.signing.seal`)."""

    def sign(self, payload: bytes, *, kind: str, model: str, version: int) -> bytes: ...


@dataclass(frozen=True)
class KeySigner:
    """A :class:`Signer` with an Ed25519 private key."""

    key: Ed25519PrivateKey

    def sign(self, payload: bytes, *, kind: str, model: str, version: int) -> bytes:
        return seal(payload, key=self.key, kind=kind, model_id=model, version=version)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeySigner:
        """Load ``coordinator.key`` from the keys dir (KeyFileError says to run ``fedmq keys generate``)."""
        private_path, _ = key_pair_paths(settings.keys_dir)
        if not private_path.exists():
            raise KeyFileError(
                f"no signing key at {private_path}: run `fedmq keys generate` (or set FEDMQ_KEYS_DIR)"
            )
        return cls(load_private_key(private_path))


def sign_code(signer: Signer, model: str, code: bytes) -> bytes:
    return signer.sign(code, kind=KIND_MODEL_CODE, model=model, version=CODE_ENVELOPE_VERSION)


def sign_version(signer: Signer, manifest: bytes, model: str, version: int) -> bytes:
    return signer.sign(manifest, kind=KIND_MODEL_WEIGHTS, model=model, version=version)


def verify_version(
    envelope: bytes, public_key: Ed25519PublicKey, model: str, version: int, frame: bytes | memoryview
) -> dict[str, Any]:
    """Check a version's signature and that ``frame`` is the signed weights; return the manifest.

    Raises a :class:`~common.errors.SignatureError` subclass when anything does not match.
    """
    _header, payload = open_envelope(
        envelope, public_key, expected_kind=KIND_MODEL_WEIGHTS, expected_model_id=model
    )
    manifest = parse_manifest(payload)
    if manifest.get("version") != version:
        raise PayloadMismatchError(f"signed manifest is for version {manifest.get('version')}, not {version}")
    if hashlib.sha256(frame).hexdigest() != manifest.get("sha256"):
        raise PayloadMismatchError(f"weights of {model} v{version} do not match the signed sha256")
    return manifest
