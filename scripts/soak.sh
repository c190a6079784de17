#!/usr/bin/env bash
# The reference-load soak (issue #14), compressed 10x: 1,000 heartbeat devices (1 msg/30 s)
# plus 100 telemetry devices (1 msg/s), a 10-minute cloud outage every 6 h (the first
# after 1 h), for any duration. Samples the gateway's RSS, renders an RSS plot (gnuplot)
# and counts loss and duplicates with fieldgate-sim's subscribers.
#
#   scripts/soak.sh DURATION [OUTDIR]
#
# DURATION in real time: 600, 10m, 2h (7.2h replays the whole 72-hour run). OUTDIR
# (default target/soak) gets samples.csv, rss.png, summary.json and summary.md.
# SOAK_BIN_DIR=DIR uses the fieldgate and fieldgate-sim binaries in DIR instead of
# building target/release ones. Exits 1 when any event was lost.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 DURATION [OUTDIR]   (DURATION: 600, 10m, 2h)" >&2
    exit 2
fi
case "$1" in
    *h) SECONDS_TOTAL=$(python3 -c "print(int(float('${1%h}') * 3600))") ;;
    *m) SECONDS_TOTAL=$(python3 -c "print(int(float('${1%m}') * 60))") ;;
    *s) SECONDS_TOTAL=${1%s} ;;
    *) SECONDS_TOTAL=$1 ;;
esac
[[ "$SECONDS_TOTAL" =~ ^[0-9]+$ ]] && [ "$SECONDS_TOTAL" -ge 60 ] \
    || { echo "soak: DURATION must be at least 60 seconds, not $1" >&2; exit 2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${2:-$ROOT/target/soak}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else echo "soak: need root (or sudo) to run: $*" >&2; return 1
    fi
}
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/sbin" ;; esac
missing=()
command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v gnuplot >/dev/null || missing+=(gnuplot-nox)
if [ ${#missing[@]} -gt 0 ]; then
    echo "soak: installing ${missing[*]}" >&2
    as_root apt-get update -q >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

if [ -n "${SOAK_BIN_DIR:-}" ]; then
    BIN=$SOAK_BIN_DIR
else
    nice -n 10 cargo build --release --locked -p fieldgate -p fieldgate-sim >&2
    BIN=$ROOT/target/release
fi
for binary in fieldgate fieldgate-sim; do
    [ -x "$BIN/$binary" ] || { echo "soak: $BIN/$binary is missing" >&2; exit 1; }
done

# 1,100 device connections plus the gateway's own.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fieldgate-soak.XXXXXX")
# A private copy: a rebuild during a long run must not swap the binaries.
cp "$BIN/fieldgate" "$BIN/fieldgate-sim" "$WORK/"
RUNNER=""
cleanup() {
    status=$?
    if [ -n "$RUNNER" ] && kill -0 "$RUNNER" 2>/dev/null; then
        kill -TERM "$RUNNER" 2>/dev/null || true
        wait "$RUNNER" 2>/dev/null || true
    fi
    if [ "$status" -eq 0 ]; then rm -rf "$WORK"; else echo "soak: logs kept in $WORK" >&2; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

python3 scripts/bench/soak_reference.py --duration "$SECONDS_TOTAL" --bin "$WORK" \
    --out "$OUT" --work "$WORK/run" &
RUNNER=$!
set +e
wait "$RUNNER"
rc=$?
set -e
RUNNER=""
exit "$rc"
