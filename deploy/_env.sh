# Shared set-up for deploy/demo.sh and deploy/test.sh (sourced, not run).
# Creates or reuses the project virtualenv .venv, installs fedmq with what it needs, and installs the
# Debian packages the demo and the tests run (rabbitmq-server; PostgreSQL's server for the tests).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"

log() { printf '\033[1m[fedmq]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[fedmq] error:\033[0m %s\n' "$*" >&2; exit 1; }

find_python() {
    for candidate in "${FEDMQ_PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

apt_install() {
    # apt_install PACKAGE...: install Debian packages, as root or through sudo.
    local runner=()
    if [ "$(id -u)" != "0" ]; then
        command -v sudo >/dev/null 2>&1 || die "need root (or sudo) to install: $*"
        runner=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* with your package manager"
    log "installing Debian packages: $* (apt-get)"
    "${runner[@]}" apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive "${runner[@]}" apt-get install -y -qq "$@" >/dev/null
}

ensure_system_packages() {
    # ensure_system_packages [postgres]: RabbitMQ always; PostgreSQL's server binaries on request.
    local wanted=()
    command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || wanted+=(rabbitmq-server)
    if [ "${1:-}" = "postgres" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        wanted+=(postgresql)
    fi
    if [ "${#wanted[@]}" -gt 0 ]; then apt_install "${wanted[@]}"; fi
}

ensure_venv() {
    # ensure_venv EXTRAS: create .venv if missing; (re)install fedmq[EXTRAS] when pyproject.toml changed.
    local extras="$1" python stamp want
    python="$(find_python)" || die "Python 3.11 or newer is needed (set FEDMQ_PYTHON to its path)"
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating the virtualenv .venv with $python"
        "$python" -m venv "$VENV"
    fi
    stamp="$VENV/.fedmq-installed"
    want="$extras $(sha256sum pyproject.toml | cut -c1-16)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        log "installing fedmq[$extras] into .venv (TensorFlow's CPU build takes about a minute the first time)"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"
        echo "$want" >"$stamp"
    fi
    export PATH="$VENV/bin:$PATH"
}
