#!/usr/bin/env bash
# Run the fedmq demo (see README.md). Installs what it needs on first use.
source "$(dirname "$0")/_env.sh"
ensure_system_packages
ensure_venv "cpu,demo"
exec fedmq demo "$@"
