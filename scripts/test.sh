#!/usr/bin/env bash
# The test command of the README: installs what the tests need when it is missing,
# then runs every test of the workspace (unit, property and black-box integration tests
# against a real mosquitto started by the tests on free loopback ports).
#
# Installs: mosquitto and mosquitto-clients (apt, system-wide, needs root or sudo) and,
# for the API fuzz test, schemathesis (pip) into a virtual environment in
# $CARGO_TARGET_DIR/pyenv (default target/pyenv; python3-venv from apt when Debian lacks
# it). FIELDGATE_API_FUZZ=long runs the long API fuzz profile (CI does).
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
# It goes into a virtual environment under the target directory, never into the system's
# or the user's site-packages; `cargo clean` removes it and the next run installs it again.
target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target_dir"
pyenv="$(cd "$target_dir" && pwd)/pyenv"
if ! "$pyenv/bin/python" -c 'import schemathesis' >/dev/null 2>&1; then
    if [ ! -x "$pyenv/bin/pip" ]; then
        rm -rf "$pyenv"
        if ! python3 -m venv "$pyenv" >/dev/null 2>&1; then
            # Debian ships venv (and ensurepip) in a package of its own.
            echo "scripts/test.sh: installing python3-venv" >&2
            as_root apt-get update
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv
            rm -rf "$pyenv"
            python3 -m venv "$pyenv"
        fi
    fi
    echo "scripts/test.sh: installing schemathesis into $pyenv" >&2
    "$pyenv/bin/python" -m pip install --quiet --disable-pip-version-check schemathesis
fi
export FIELDGATE_PYTHON="$pyenv/bin/python"

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --all-features --no-fail-fast "$@"
    # nextest does not run doctests.
    cargo test --workspace --all-features --doc
else
    cargo test --workspace --all-features --no-fail-fast "$@"
fi
