#!/usr/bin/env bash
# fieldgate benchmark suite: fieldgate beside Mosquitto (as a broker and as a bridge),
# in the same run on the same machine. Writes scripts/bench/results.json and the
# generated tables of docs/BENCHMARKS.md.
#
#   scripts/bench.sh            full run (medians of 3; about 30-40 minutes on 2 cores)
#   scripts/bench.sh quick      one run of each scenario, shorter steps (about 10 minutes)
#   scripts/bench.sh quick load,storm   only some scenarios (idle,load,ramp,drain,outage,restart,storm);
#                                       the others are kept from the previous results file
#   scripts/bench.sh quick soak         the reference-load soak for 10 minutes (scripts/soak.sh 10m,
#                                       100 simulated minutes with one cloud outage) into
#                                       docs/bench/soak-reference/; not in the default set
#
# Needs: cargo, mosquitto + mosquitto_sub (mosquitto-clients), python3, stdbuf (coreutils).
# Everything it starts is killed by PID on exit; ports are picked free in 30000-39999.
set -euo pipefail

MODE=${1:-full}
ONLY=${2:-idle,load,ramp,drain,outage,restart,storm}
case "$MODE" in quick|full) ;; *) echo "usage: $0 [quick|full] [scenario,...]" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
for tool in cargo mosquitto mosquitto_sub python3 stdbuf; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install mosquitto mosquitto-clients)" >&2; exit 1; }
done

# As many file descriptors as allowed (10,000 idle devices need 10,000 on each side).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 12000 ]; then
  echo "bench: ulimit -n is $(ulimit -n); the 10,000-connection scenario needs about 11,000" >&2
fi

export BENCH_BUILD="built by this run"
if [ "${BENCH_NO_BUILD:-0}" = 1 ]; then
  BENCH_BUILD="not rebuilt (BENCH_NO_BUILD=1)"
  echo "bench: BENCH_NO_BUILD=1: using the existing target/release binaries" >&2
else
  echo "bench: building release binaries" >&2
  if ! cargo build --release -p fieldgate --bin fieldgate -p fieldgate-sim >&2; then
    [ -x target/release/fieldgate ] && [ -x target/release/fieldgate-sim ] || { echo "bench: build failed" >&2; exit 1; }
    BENCH_BUILD="build FAILED; measured the previous target/release binaries"
    echo "bench: build failed; measuring the existing target/release binaries" >&2
  fi
fi

WORK=$(mktemp -d /tmp/fieldgate-bench.XXXXXX)
mkdir -p "$WORK/bin"
# A private copy: other builds on this machine must not swap the binary mid-run.
cp target/release/fieldgate target/release/fieldgate-sim "$WORK/bin/"

RUNNER_PID=""
cleanup() {
  status=$?
  if [ -n "$RUNNER_PID" ] && kill -0 "$RUNNER_PID" 2>/dev/null; then
    kill -TERM "$RUNNER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$RUNNER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$RUNNER_PID" 2>/dev/null || true
  fi
  if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "bench: work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# The runner kills what it started (by PID) on exit, on SIGTERM and on SIGINT.
set +e
# The soak is its own script (scripts/soak.sh), on the same binaries.
SOAK=0
case ",$ONLY," in *,soak,*) SOAK=1; ONLY=$(echo ",$ONLY," | sed 's/,soak,/,/; s/^,//; s/,$//') ;; esac
rc=0
if [ -n "$ONLY" ]; then
  python3 scripts/bench/run.py --mode "$MODE" --only "$ONLY" --work "$WORK" --bin "$WORK/bin" \
    --root "$ROOT" --out scripts/bench/results.json --render docs/BENCHMARKS.md &
  RUNNER_PID=$!
  wait "$RUNNER_PID"
  rc=$?
  RUNNER_PID=""
fi
if [ "$SOAK" = 1 ]; then
  SOAK_BIN_DIR="$WORK/bin" scripts/soak.sh 10m docs/bench/soak-reference &
  RUNNER_PID=$!
  wait "$RUNNER_PID"
  soak_rc=$?
  RUNNER_PID=""
  [ "$rc" -ne 0 ] || rc=$soak_rc
fi
set -e
python3 scripts/bench/render.py scripts/bench/results.json docs/BENCHMARKS.md --summary
exit "$rc"
