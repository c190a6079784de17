#!/usr/bin/env bash
# Release build: static Linux binaries for x86_64 and aarch64, their Debian packages and
# checksums, all in dist/:
#
#   dist/fieldgate-VERSION-x86_64-linux     static-pie, glibc (-C target-feature=+crt-static)
#   dist/fieldgate-VERSION-aarch64-linux    the same for aarch64, cross-built here
#   dist/fieldgate_VERSION_amd64.deb, dist/fieldgate_VERSION_arm64.deb
#   dist/SHA256SUMS
#
#   scripts/release.sh            everything (cold: about 45 minutes per target on 2 busy cores)
#   scripts/release.sh x86_64     only the x86_64 binary and .deb
#   scripts/release.sh aarch64    only the aarch64 binary and .deb
#
# Installs what it needs from Debian (as root, or through sudo). rustup cannot add targets
# here, so aarch64 uses Debian's own Rust (rustc-web/cargo-web, 1.96) with the arm64 std
# (libstd-rust-web-dev:arm64, after `dpkg --add-architecture arm64`), gcc-aarch64-linux-gnu
# as linker and C compiler (ring has C and assembly parts), and qemu-user-static to run
# the result once as a check. x86_64 uses the rustup toolchain. Both builds use
# --locked, strip symbols and link the C runtime statically, so one file runs on any
# Linux of its architecture (and in a scratch container).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
ARCHES=${*:-x86_64 aarch64}
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
DIST=$ROOT/dist
mkdir -p "$DIST"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else echo "release: need root (or sudo) to run: $*" >&2; return 1
    fi
}

APT_UPDATED=0
# Installs the Debian packages given that are not installed yet.
need_packages() {
    local missing=()
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "release: installing ${missing[*]}" >&2
    if [ "$APT_UPDATED" = 0 ]; then as_root apt-get update -q >&2; APT_UPDATED=1; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >&2
}

# Seconds since the epoch, for the build times printed at the end.
now() { date +%s; }
SUMMARY=()

build_x86_64() {
    local started
    started=$(now)
    # --target keeps crt-static away from build scripts and proc macros. fieldgate-sim is
    # built alongside with the same features (the soak and benchmarks use it), so that
    # building either alone does not rebuild the shared dependencies.
    RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=symbols \
        nice -n 10 cargo build --release --locked --target x86_64-unknown-linux-gnu \
        -p fieldgate -p fieldgate-sim
    local out=$DIST/fieldgate-$VERSION-x86_64-linux
    cp target/x86_64-unknown-linux-gnu/release/fieldgate "$out"
    check_static "$out"
    "$out" --version >&2
    SUMMARY+=("x86_64: $(stat -c %s "$out") bytes, built in $(( $(now) - started )) s")
    scripts/package-deb.sh "$out" amd64 "$DIST" >/dev/null
}

build_aarch64() {
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        as_root dpkg --add-architecture arm64
        APT_UPDATED=0
    fi
    need_packages rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu \
        libc6-dev-arm64-cross qemu-user-static
    local started
    started=$(now)
    # Debian's toolchain in its own target dir: a different rustc rebuilds everything.
    RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO_TARGET_DIR=target/debian-cross \
        RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=symbols \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
        CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
        AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
        nice -n 10 /usr/bin/cargo build --release --locked --target aarch64-unknown-linux-gnu \
        -p fieldgate
    local out=$DIST/fieldgate-$VERSION-aarch64-linux
    cp target/debian-cross/aarch64-unknown-linux-gnu/release/fieldgate "$out"
    check_static "$out"
    qemu-aarch64-static "$out" --version >&2
    SUMMARY+=("aarch64: $(stat -c %s "$out") bytes, built in $(( $(now) - started )) s")
    scripts/package-deb.sh "$out" arm64 "$DIST" >/dev/null
}

# Fails unless $1 is a statically linked executable (no program interpreter).
check_static() {
    if readelf -l "$1" | grep -q "Requesting program interpreter"; then
        echo "release: $1 is dynamically linked" >&2
        exit 1
    fi
}

need_packages binutils
for arch in $ARCHES; do
    case "$arch" in
        x86_64) build_x86_64 ;;
        aarch64) build_aarch64 ;;
        *) echo "usage: $0 [x86_64] [aarch64]" >&2; exit 2 ;;
    esac
done

(cd "$DIST" && shopt -s nullglob && rm -f SHA256SUMS && sha256sum fieldgate-"$VERSION"-* fieldgate_"$VERSION"_*.deb > SHA256SUMS)
printf 'release: %s\n' "${SUMMARY[@]}" >&2
ls -l "$DIST" >&2
