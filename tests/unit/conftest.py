"""Fixtures shared by the worker model-store tests: the coordinator's key and a store trusting it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import keyfiles
from worker.models import ModelStore


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return keyfiles.generate_key()


@pytest.fixture
def store(tmp_path: Path, key: Ed25519PrivateKey) -> ModelStore:
    return ModelStore(tmp_path / "cache", key.public_key())
