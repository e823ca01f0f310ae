"""Shared pytest configuration: fixtures live in tests/fixtures/, one module per real component."""

from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.fixtures.rabbitmq",
    "tests.fixtures.postgres",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long variants (``@pytest.mark.slow``) run only when FEDMQ_LONG_TESTS=1."""
    if os.environ.get("FEDMQ_LONG_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="long variant: set FEDMQ_LONG_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
