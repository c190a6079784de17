#!/usr/bin/env bash
# The test command of the README: installs what the tests need when it is missing,
# then runs every test of the workspace (unit, property and black-box integration tests
# against a real mosquitto started by the tests on free loopback ports).
set -euo pipefail

cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "scripts/test.sh: need root (or sudo) to run: $*" >&2
        return 1
    fi
}

# mosquitto lives in /usr/sbin, which is not on every user's PATH.
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/sbin" ;; esac

if ! command -v mosquitto >/dev/null 2>&1 || ! command -v mosquitto_sub >/dev/null 2>&1; then
    echo "scripts/test.sh: installing mosquitto and mosquitto-clients" >&2
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto mosquitto-clients
fi
# Debian's package may start a system broker on 1883; the tests never use fixed ports,
# so it does no harm and is left alone.

# schemathesis (PyPI) fuzzes the REST API from its OpenAPI document (tests/api_fuzz.rs).
if ! python3 -c 'import schemathesis' >/dev/null 2>&1; then
    echo "scripts/test.sh: installing schemathesis" >&2
    python3 -m pip install --quiet schemathesis \
        || python3 -m pip install --quiet --break-system-packages schemathesis
fi

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --all-features --no-fail-fast "$@"
    # nextest does not run doctests.
    cargo test --workspace --all-features --doc
else
    cargo test --workspace --all-features --no-fail-fast "$@"
fi
