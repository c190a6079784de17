#!/usr/bin/env python3
"""Soak test: fieldgate (tcp -> disk buffer -> mqtt QoS 1) -> cloud mosquitto under a
constant load from fieldgate-sim, sampling both processes' VmRSS every 10 s.

Writes docs/bench/soak-rss.csv (samples), docs/bench/soak-sim.json (the sim's summary) and
docs/bench/soak.md (machine, command lines, RSS slope, summary). Python stdlib only.

  scripts/bench/soak.py --duration 1800 --devices 500 --rate 10 --port-base 51000
"""
import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_kb(pid):
    """VmRSS of pid in KiB, or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid):
    """utime + stime of pid in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def metric(api, name):
    """Sum of every sample of a Prometheus metric, or None if the API does not answer."""
    try:
        with urllib.request.urlopen(f"http://{api}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total = (total or 0) + float(line.rsplit(" ", 1)[1])
    return total


def wait_port(port, deadline_s):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    sys.exit(f"port {port} did not open within {deadline_s}s")


def slope_mb_per_min(points):
    """Least-squares slope of (t_s, kib) in MB/min (MB = 10^6 bytes)."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in points)
    kib_per_s = sxy / sxx
    return kib_per_s * 1024 * 60 / 1e6


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout
    mosq = mosq.splitlines()[0] if mosq else "mosquitto ?"
    return (f"{cpu}, {os.cpu_count()} cores, {mem_kb // 1024} MiB RAM, "
            f"Linux {platform.release()}, {mosq}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=1800, help="seconds of load")
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--rate", type=float, default=10, help="msg/s per device")
    ap.add_argument("--interval", type=float, default=10, help="sampling period, s")
    ap.add_argument("--skip", type=int, default=300, help="seconds left out of the slope")
    ap.add_argument("--port-base", type=int, default=51000)
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target/release"))
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "docs/bench"))
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    cloud, tcp, api = args.port_base + 883, args.port_base + 700, args.port_base + 80
    work = tempfile.mkdtemp(prefix="fieldgate-soak-")
    # Copy the binaries so a rebuild during the soak does not touch the processes under test.
    for b in ("fieldgate", "fieldgate-sim"):
        shutil.copy2(os.path.join(args.bin_dir, b), os.path.join(work, b))
    gw_bin, sim_bin = os.path.join(work, "fieldgate"), os.path.join(work, "fieldgate-sim")

    with open(os.path.join(work, "mosquitto.conf"), "w") as f:
        f.write(f"listener {cloud} 127.0.0.1\nallow_anonymous true\n"
                "max_queued_messages 0\nmax_inflight_messages 0\n")
    gw_conf = f"""[gateway]
id = "gw-soak"
data_dir = "{work}/data"

[log]
level = "warn"

[api]
address = "127.0.0.1:{api}"

[sources.devices]
type = "tcp"
address = "127.0.0.1:{tcp}"
framing = "lines"

[sinks.cloud]
type = "mqtt"
inputs = ["devices"]
url = "mqtt://127.0.0.1:{cloud}"
client_id = "gw-soak"
topic = "gateways/{{gateway}}/devices/{{device}}/{{kind}}"
qos = 1

[sinks.cloud.buffer]
type = "disk"
max_size = "1GiB"
when_full = "block"
"""
    with open(os.path.join(work, "gateway.toml"), "w") as f:
        f.write(gw_conf)

    mosq_cmd = ["mosquitto", "-c", os.path.join(work, "mosquitto.conf")]
    gw_cmd = [gw_bin, "run", "--config", os.path.join(work, "gateway.toml")]
    sim_cmd = [sim_bin, "tcp", "--target", f"127.0.0.1:{tcp}", "--devices", str(args.devices),
               "--rate", str(args.rate), "--duration", str(args.duration),
               "--subscribe", f"mqtt://127.0.0.1:{cloud}", "--sub-topic", "gateways/#"]

    logs = {n: open(os.path.join(work, n + ".log"), "w") for n in ("mosquitto", "gateway", "sim")}
    procs = []
    try:
        mosq = subprocess.Popen(mosq_cmd, stdout=logs["mosquitto"], stderr=subprocess.STDOUT)
        procs.append(mosq)
        wait_port(cloud, 10)
        gw = subprocess.Popen(gw_cmd, stdout=subprocess.DEVNULL, stderr=logs["gateway"])
        procs.append(gw)
        wait_port(tcp, 30)
        sim_out = os.path.join(work, "sim.json")
        with open(sim_out, "w") as out:
            sim = subprocess.Popen(sim_cmd, stdout=out, stderr=logs["sim"])
            procs.append(sim)
            start = time.monotonic()
            csv_path = os.path.join(args.out_dir, "soak-rss.csv")
            samples = []
            with open(csv_path, "w") as csv:
                csv.write("t_s,gateway_rss_kib,mosquitto_rss_kib,gateway_cpu_s,mosquitto_cpu_s,"
                          "gateway_buffer_events,gateway_sent_events\n")
                next_t = start
                while True:
                    t = time.monotonic() - start
                    row = (round(t, 1), rss_kb(gw.pid), rss_kb(mosq.pid), cpu_seconds(gw.pid),
                           cpu_seconds(mosq.pid), metric(f"127.0.0.1:{api}", "fieldgate_buffer_events"),
                           metric(f"127.0.0.1:{api}", "fieldgate_sent_events_total"))
                    samples.append(row)
                    csv.write(",".join("" if v is None else str(v) for v in row) + "\n")
                    csv.flush()
                    if sim.poll() is not None:
                        break
                    next_t += args.interval
                    # Sampling period, not synchronisation: wake early if the sim exits.
                    try:
                        sim.wait(timeout=max(0.0, next_t - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
        sim_rc = sim.returncode
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()

    with open(sim_out) as f:
        raw = f.read()
    shutil.copy2(sim_out, os.path.join(args.out_dir, "soak-sim.json"))
    try:
        summary = json.loads(raw)
    except ValueError:
        summary = {"unparsed": raw[-2000:]}

    window = [s for s in samples if args.skip <= s[0] <= args.duration]
    gw_pts = [(s[0], s[1]) for s in window if s[1] is not None]
    mq_pts = [(s[0], s[2]) for s in window if s[2] is not None]
    gw_slope, mq_slope = slope_mb_per_min(gw_pts), slope_mb_per_min(mq_pts)

    def mib(pts, f):
        return f"{f(p[1] for p in pts) / 1024:.1f}" if pts else "?"

    def cpu_pct(col):
        pts = [(s[0], s[col]) for s in window if s[col] is not None]
        if len(pts) < 2:
            return "?"
        return f"{100 * (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]):.0f}"

    lat = summary.get("latency_us", {}) if isinstance(summary, dict) else {}
    keys = ("sent", "acked", "received", "lost", "duplicates")
    md = f"""# Soak: {args.devices * args.rate:,.0f} msg/s for {args.duration // 60} minutes

Generated by `scripts/bench/soak.py` on {time.strftime('%Y-%m-%d %H:%M %Z')}.
Samples: [soak-rss.csv](soak-rss.csv) (every {args.interval:g} s); sim summary: [soak-sim.json](soak-sim.json).

**Machine:** {machine()}

**Set-up:** fieldgate (tcp source, `lines` framing, MQTT sink QoS 1, one publish per event,
1 GiB disk buffer, `when_full = "block"`, `fsync = "interval"` 1 s) → mosquitto as the cloud broker
(`max_queued_messages 0`, `max_inflight_messages 0`) → the sim's QoS 1 subscriber on `gateways/#`.
Everything on one machine, loopback.

```sh
{' '.join(mosq_cmd)}
{' '.join(gw_cmd)}
{' '.join(sim_cmd)}
```

Gateway config:

```toml
{gw_conf.replace(work, '$WORK')}```

## RSS

Least-squares slope over t = {args.skip}..{args.duration} s (the first {args.skip // 60} minutes of
warm-up left out), {len(gw_pts)} samples:

| process | RSS slope (MB/min) | RSS min (MiB) | RSS max (MiB) | RSS at end (MiB) | CPU (% of one core) |
|---|---|---|---|---|---|
| fieldgate | {gw_slope:+.3f} | {mib(gw_pts, min)} | {mib(gw_pts, max)} | {mib(gw_pts[-1:], max)} | {cpu_pct(3)} |
| mosquitto (cloud broker) | {mq_slope:+.3f} | {mib(mq_pts, min)} | {mib(mq_pts, max)} | {mib(mq_pts[-1:], max)} | {cpu_pct(4)} |

## Delivery (fieldgate-sim summary, exit code {sim_rc})

| {' | '.join(keys)} | p50 (ms) | p99 (ms) | p999 (ms) | max (ms) |
|{'---|' * (len(keys) + 4)}
| {' | '.join(str(summary.get(k, '?')).replace('None', 'n/a') if isinstance(summary, dict) else '?' for k in keys)} | {' | '.join(f"{lat[k] / 1000:.1f}" if isinstance(lat.get(k), (int, float)) else '?' for k in ('p50', 'p99', 'p999', 'max'))} |
"""
    with open(os.path.join(args.out_dir, "soak.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"work dir (logs): {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
