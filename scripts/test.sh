#!/usr/bin/env bash
# The test command of the README: installs what the tests need when it is missing,
# then runs every test of the workspace (unit, property and black-box integration tests
# against a real mosquitto started by the tests on free loopback ports).
#
# Installs: mosquitto and mosquitto-clients (apt, system-wide, needs root or sudo) and,
# for the API fuzz test and the Modbus tests, schemathesis and pymodbus (with pyserial)
# (pip) into a virtual environment in $CARGO_TARGET_DIR/pyenv (default target/pyenv;
# python3-venv from apt when Debian lacks it). FIELDGATE_API_FUZZ=long runs the long API
# fuzz profile (CI does).
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

# schemathesis (PyPI) fuzzes the REST API from its OpenAPI document (tests/api_fuzz.rs);
# pymodbus serves Modbus TCP and RTU to tests/modbus.rs (tests/fixtures/modbus_sim.py; its
# simulator API changes between releases, hence the pin). They go into a virtual
# environment under the target directory, never into the system's or the user's
# site-packages; `cargo clean` removes it and the next run installs it again.
target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target_dir"
pyenv="$(cd "$target_dir" && pwd)/pyenv"
if ! "$pyenv/bin/python" -c 'import schemathesis, serial, pymodbus.simulator, paho.mqtt' >/dev/null 2>&1; then
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
    echo "scripts/test.sh: installing schemathesis, pymodbus and paho-mqtt into $pyenv" >&2
    "$pyenv/bin/python" -m pip install --quiet --disable-pip-version-check schemathesis \
        pymodbus==3.16.1 pyserial==3.5 paho-mqtt
fi
export FIELDGATE_PYTHON="$pyenv/bin/python"

# ---- release and deploy prerequisites (issue #14; tests/packaging.rs, observability.rs,
# aarch64_qemu.rs, container.rs). Each missing tool makes its test print SKIPPED.
# promtool: from Debian's prometheus package, unpacked under target/tools (about 19 MB;
# installing the package would start a Prometheus server).
if ! command -v promtool >/dev/null 2>&1 && [ ! -x target/tools/prometheus/usr/bin/promtool ]; then
    echo "scripts/test.sh: unpacking promtool from Debian's prometheus package" >&2
    mkdir -p target/tools
    if (cd target/tools && apt-get download prometheus >/dev/null 2>&1 \
        || { as_root apt-get update >/dev/null && apt-get download prometheus >/dev/null; }); then
        dpkg-deb -x target/tools/prometheus_*.deb target/tools/prometheus
        rm -f target/tools/prometheus_*.deb
    else
        echo "scripts/test.sh: cannot download prometheus; the promtool test will be skipped" >&2
    fi
fi
# qemu-user, only when scripts/release.sh has built the aarch64 binary (CI's clean clone
# has none, and its test skips).
if ls dist/fieldgate-*-aarch64-linux >/dev/null 2>&1 && ! command -v qemu-aarch64-static >/dev/null 2>&1; then
    echo "scripts/test.sh: installing qemu-user-static for the aarch64 test" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        qemu-user-static >/dev/null || echo "scripts/test.sh: qemu-user-static not installed" >&2
fi
# The tests print SKIPPED in their own output, which the runner hides on success: say it here.
ls dist/fieldgate-*-aarch64-linux >/dev/null 2>&1 \
    || echo "scripts/test.sh: SKIPPED aarch64 qemu-user test: no dist/ binary (run scripts/release.sh first)" >&2
ls dist/fieldgate-*-x86_64-linux >/dev/null 2>&1 && { podman info >/dev/null 2>&1 || docker info >/dev/null 2>&1; } \
    || echo "scripts/test.sh: SKIPPED container image test: needs a container engine and dist/ from scripts/release.sh" >&2
command -v systemd-analyze >/dev/null 2>&1 \
    || echo "scripts/test.sh: SKIPPED systemd unit verification: no systemd-analyze" >&2
# ---- end of release and deploy prerequisites

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --all-features --no-fail-fast "$@"
    # nextest does not run doctests.
    cargo test --workspace --all-features --doc
else
    cargo test --workspace --all-features --no-fail-fast "$@"
fi
