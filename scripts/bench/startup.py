#!/usr/bin/env python3
"""Start-up time and idle RSS of a fieldgate binary (docs/BENCHMARKS.md, release binaries).

Start-up: from exec to the first 200 from /readyz (listeners bound, buffers open), with a
TCP source, a file sink and an MQTT sink whose broker is down, fresh data dir each run;
the median of --runs. Idle RSS: VmRSS 5 s after ready, with no device connected. With
--prefix the binary runs under that program (qemu-aarch64-static): the figures are then
the emulator's, not a real ARM board's.

  scripts/bench/startup.py dist/fieldgate-0.1.0-x86_64-linux
  scripts/bench/startup.py dist/fieldgate-0.1.0-aarch64-linux --prefix qemu-aarch64-static
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def one_run(binary, prefix, work):
    api, dev, mqtt = free_port(), free_port(), free_port()
    conf = os.path.join(work, "fieldgate.toml")
    with open(conf, "w") as f:
        f.write(f"""[gateway]
id = "gw-startup"
data_dir = "{os.path.join(work, "data")}"
[log]
level = "warn"
[api]
address = "127.0.0.1:{api}"
[sources.devices]
type = "tcp"
address = "127.0.0.1:{dev}"
framing = "lines"
[sinks.local]
type = "file"
inputs = ["devices"]
[sinks.cloud]
type = "mqtt"
inputs = ["devices"]
url = "mqtt://127.0.0.1:{mqtt}"
[sinks.cloud.buffer]
type = "disk"
""")
    t0 = time.monotonic()
    proc = subprocess.Popen(prefix + [binary, "run", "--config", conf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = t0 + 60
        while not ready(api):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{binary} did not become ready")
            time.sleep(0.002)
        startup = time.monotonic() - t0
        time.sleep(5)
        return startup, rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--prefix", default="", help="program to run the binary under")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    prefix = [args.prefix] if args.prefix else []
    startups, rss = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as work:
            s, r = one_run(os.path.abspath(args.binary), prefix, work)
            startups.append(s * 1000)
            rss.append(r)
    print(json.dumps({
        "binary": args.binary,
        "size_bytes": os.path.getsize(args.binary),
        "startup_ms_median": round(statistics.median(startups), 1),
        "startup_ms": [round(s, 1) for s in startups],
        "idle_rss_kib_median": statistics.median(rss),
    }))


if __name__ == "__main__":
    main()
