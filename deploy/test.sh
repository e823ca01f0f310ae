#!/usr/bin/env bash
# Run the whole test suite: lint (ruff), types (mypy), then pytest — unit tests, integration tests
# against a real RabbitMQ and real SQLite/PostgreSQL servers the suite starts itself, and the dafne-dl
# interoperability tests (in their own virtualenv, .dafne-env, built on first use).
# Extra arguments go to pytest, e.g. deploy/test.sh -k codec
source "$(dirname "$0")/_env.sh"
ensure_system_packages postgres
ensure_venv "cpu,dev"
log "ruff"
ruff check .
ruff format --check .
log "mypy"
mypy
log "pytest"
exec python -m pytest "$@"
