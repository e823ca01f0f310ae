"""Fixtures for the dafne-dl interop tests: the dafne-dl environment, built once per machine."""

from __future__ import annotations

import pytest

from tests.interop.dafne_env import DafneEnv, DafneEnvError, ensure_dafne_env


@pytest.fixture(scope="session")
def dafne_env() -> DafneEnv:
    """The dafne-dl environment at ``.dafne-env``, built on first use (a minute or two), then reused.

    A build that fails makes the tests fail (never skip) with pip's output tail.
    """
    try:
        return ensure_dafne_env()
    except DafneEnvError as exc:
        pytest.fail(f"cannot build the dafne-dl environment:\n{exc}", pytrace=False)
