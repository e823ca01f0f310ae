"""Shared pytest configuration: fixtures live in tests/fixtures/, one module per real component."""

pytest_plugins = [
    "tests.fixtures.rabbitmq",
    "tests.fixtures.postgres",
]
