#!/usr/bin/env python3
"""The reference-load soak, compressed in time: fieldgate under 1,000 heartbeat devices
(1 msg / 30 s each) and 100 telemetry devices (1 msg/s each), with a 10-minute cloud
outage every 6 hours, all replayed `--speed` times faster (10x: 72 h in 7.2 h).

Topology (loopback only): fieldgate-sim (two groups, ack mode) -> fieldgate (TCP source,
disk buffer, MQTT QoS 1) -> an outage proxy -> mosquitto (the "cloud") <- the sims'
subscribers, which count loss and duplicates. An outage closes the proxy: the gateway's
link goes down, the subscribers stay connected, so every event must arrive once the
proxy is back. Samples the gateway's RSS every `--sample` seconds, renders an RSS plot
with gnuplot, and writes summary.json and summary.md into `--out`.

Run it through scripts/soak.sh, which builds the binaries and installs the tools.
Python stdlib only; every child is killed by PID on exit.
"""
import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

# The reference load, in simulated time.
HEARTBEAT_DEVICES = 1000
HEARTBEAT_PERIOD_S = 30.0
TELEMETRY_DEVICES = 100
TELEMETRY_PERIOD_S = 1.0
OUTAGE_EVERY_S = 6 * 3600
OUTAGE_LENGTH_S = 600
# The first outage comes after one simulated hour (6 real minutes at 10x), so that a
# 10-minute run has one; later ones every OUTAGE_EVERY_S.
FIRST_OUTAGE_S = 3600

CHILDREN = []


def log(msg):
    print(f"soak: {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, logfile, **kw):
    out = open(logfile, "w")
    proc = subprocess.Popen(cmd, stdout=kw.pop("stdout", out), stderr=out, **kw)
    CHILDREN.append(proc)
    return proc


def stop(proc, timeout=15):
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cleanup():
    for proc in reversed(CHILDREN):
        stop(proc, timeout=5)


def wait_until(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    sys.exit(f"soak: {what} not within {timeout}s")


def port_open(port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except OSError:
        return None, ""


def metric_sum(text, name):
    total = None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


class OutageProxy:
    """A TCP proxy for the gateway's cloud link that can be taken down: `down()` closes
    the listener and every open connection (the gateway sees the cloud vanish), `up()`
    listens again on the same port."""

    def __init__(self, listen_port, target_port):
        self.listen_port = listen_port
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.writers = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    async def _pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_reader, client_writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        self.writers |= {client_writer, up_writer}
        await asyncio.gather(self._pipe(client_reader, up_writer),
                             self._pipe(up_reader, client_writer))
        self.writers -= {client_writer, up_writer}

    async def _up(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port,
                                                 reuse_address=True)

    async def _down(self):
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()

    def up(self):
        self._call(self._up())

    def down(self):
        self._call(self._down())


def least_squares_slope(points):
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in points)
    return sxy / sxx if sxx else float("nan")


def plot(out, work, samples_csv, outages, slope, warmup_s):
    """Renders rss.png with gnuplot: gateway RSS (MiB) and backlog over real minutes."""
    script = os.path.join(work, "rss.gnuplot")
    rects = "\n".join(
        f"set object {i + 1} rect from {a / 60:.3f}, graph 0 to {b / 60:.3f}, graph 1 "
        "behind fc rgb '#f4cccc' fs solid 0.6 noborder"
        for i, (a, b) in enumerate(outages))
    with open(script, "w") as f:
        f.write(f"""set terminal pngcairo size 1100,500 font ',10'
set output '{os.path.join(out, "rss.png")}'
set datafile separator ','
set title 'fieldgate soak: reference load at 10x; RSS slope after {warmup_s / 60:.0f} min warm-up: {slope:+.3f} MB/h (shaded: cloud outages)'
set xlabel 'real time (minutes)'
set ylabel 'gateway RSS (MiB)'
set y2label 'buffered events'
set ytics nomirror
set y2tics
set yrange [0:*]
set y2range [0:*]
set key top left
set grid
{rects}
plot '{samples_csv}' skip 1 using ($1/60):($2/1024) with lines lw 2 title 'fieldgate RSS', \\
     '' skip 1 using ($1/60):6 axes x1y2 with lines lw 1 lc rgb '#888888' title 'buffered events'
""")
    result = subprocess.run(["gnuplot", script], capture_output=True, text=True)
    if result.returncode != 0:
        log(f"gnuplot failed: {result.stderr.strip()}")
        return None
    return os.path.join(out, "rss.png")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, required=True, help="real seconds of load")
    ap.add_argument("--bin", required=True, help="directory with fieldgate and fieldgate-sim")
    ap.add_argument("--out", required=True, help="directory for samples, plot and summary")
    ap.add_argument("--work", required=True, help="scratch directory (configs, logs, buffers)")
    ap.add_argument("--speed", type=float, default=10.0, help="time compression factor")
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=None,
                    help="real seconds left out of the RSS slope (default: a fifth, at most 15 min)")
    args = ap.parse_args()
    warmup = args.warmup if args.warmup is not None else min(900.0, args.duration / 5)
    os.makedirs(args.out, exist_ok=True)
    work = args.work
    os.makedirs(work, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    cloud_port, proxy_port, api_port, device_port = (free_port() for _ in range(4))
    with open(os.path.join(work, "mosquitto.conf"), "w") as f:
        f.write(f"listener {cloud_port} 127.0.0.1\nallow_anonymous true\n"
                "max_queued_messages 0\nmax_inflight_messages 0\n")
    gateway_conf = f"""[gateway]
id = "gw-soak"
data_dir = "{os.path.join(work, "data")}"

[log]
level = "warn"

[api]
address = "127.0.0.1:{api_port}"

[sources.devices]
type = "tcp"
address = "127.0.0.1:{device_port}"
framing = "lines"
# Devices resend what was not acked: acked means stored in the buffer.
ack = true

[sinks.cloud]
type = "mqtt"
inputs = ["devices"]
url = "mqtt://127.0.0.1:{proxy_port}"
client_id = "gw-soak"
topic = "gateways/{{gateway}}/devices/{{device}}/{{kind}}"
qos = 1
reconnect_max = "2s"

[sinks.cloud.buffer]
type = "disk"
max_size = "1GiB"
when_full = "block"
"""
    with open(os.path.join(work, "gateway.toml"), "w") as f:
        f.write(gateway_conf)

    gw_bin = os.path.join(args.bin, "fieldgate")
    sim_bin = os.path.join(args.bin, "fieldgate-sim")
    mosquitto = start(["mosquitto", "-c", os.path.join(work, "mosquitto.conf")],
                      os.path.join(work, "mosquitto.log"))
    wait_until(lambda: port_open(cloud_port), 10, "mosquitto listening")
    proxy = OutageProxy(proxy_port, cloud_port)
    proxy.up()
    gateway = start([gw_bin, "run", "--config", os.path.join(work, "gateway.toml")],
                    os.path.join(work, "gateway.log"))
    wait_until(lambda: http_get(api_port, "/readyz")[0] == 200, 30, "gateway ready")

    groups = [("hb", HEARTBEAT_DEVICES, HEARTBEAT_PERIOD_S), ("tel", TELEMETRY_DEVICES, TELEMETRY_PERIOD_S)]
    sims = {}
    # Long enough for the backlog of an outage ending just before the end to drain.
    drain = OUTAGE_LENGTH_S / args.speed * 3 + 60
    for prefix, devices, period in groups:
        cmd = [sim_bin, "tcp", "--target", f"127.0.0.1:{device_port}", "--ack",
               "--devices", str(devices), "--prefix", prefix,
               "--rate", f"{args.speed / period:.6f}", "--jitter", "1", "--ramp", "200",
               "--duration", f"{args.duration:.0f}",
               "--subscribe", f"mqtt://127.0.0.1:{cloud_port}", "--sub-topic", "gateways/#",
               "--drain-timeout", f"{drain:.0f}s"]
        sims[prefix] = (cmd, start(cmd, os.path.join(work, f"sim-{prefix}.log"),
                                   stdout=subprocess.PIPE))
    t0 = time.monotonic()
    log(f"running {args.duration:.0f} s at {args.speed:g}x ({args.duration * args.speed / 3600:.1f} simulated hours)")

    # Outage windows in real seconds from t0.
    outages = []
    t = FIRST_OUTAGE_S
    while t / args.speed < args.duration:
        start_s = t / args.speed
        outages.append((start_s, min(start_s + OUTAGE_LENGTH_S / args.speed, args.duration)))
        t += OUTAGE_EVERY_S

    samples_csv = os.path.join(args.out, "samples.csv")
    samples = []
    next_outage = 0
    down = False
    with open(samples_csv, "w") as csv:
        csv.write("t_s,gateway_rss_kib,gateway_cpu_s,mosquitto_rss_kib,sent_events,buffer_events,upstream_connected\n")
        next_sample = 0.0
        while any(p.poll() is None for _, p in sims.values()):
            now = time.monotonic() - t0
            if next_outage < len(outages):
                a, b = outages[next_outage]
                if not down and now >= a:
                    proxy.down()
                    down = True
                    log(f"cloud outage at {now:.0f} s")
                elif down and now >= b:
                    proxy.up()
                    down = False
                    next_outage += 1
                    log(f"cloud back at {now:.0f} s")
            if now >= next_sample:
                if gateway.poll() is not None:
                    sys.exit(f"soak: the gateway exited ({gateway.returncode}); see {work}/gateway.log")
                text = http_get(api_port, "/metrics")[1]
                row = (round(now, 1), rss_kib(gateway.pid), cpu_seconds(gateway.pid),
                       rss_kib(mosquitto.pid), metric_sum(text, "fieldgate_sent_events_total"),
                       metric_sum(text, "fieldgate_buffer_events"),
                       metric_sum(text, "fieldgate_upstream_connected"))
                samples.append(row)
                csv.write(",".join("" if v is None else f"{v:g}" for v in row) + "\n")
                csv.flush()
                next_sample += args.sample
            time.sleep(0.2)
    if down:
        proxy.up()

    results = {}
    for prefix, (cmd, proc) in sims.items():
        out = proc.stdout.read().decode()
        proc.wait()
        try:
            results[prefix] = json.loads(out)
        except json.JSONDecodeError:
            sys.exit(f"soak: sim {prefix} printed no summary (exit {proc.returncode}); see {work}/sim-{prefix}.log")
    stop(gateway)
    stop(mosquitto)

    steady = [(s[0] / 3600, s[1] * 1024 / 1e6) for s in samples if s[0] >= warmup and s[1]]
    slope = least_squares_slope(steady)
    rss_mib = [s[1] / 1024 for s in samples if s[1]]
    cpu = samples[-1][2] / samples[-1][0] * 100 if samples and samples[-1][2] and samples[-1][0] else None
    summary = {
        "duration_s": args.duration,
        "speed": args.speed,
        "simulated_hours": args.duration * args.speed / 3600,
        "outages_real_s": outages,
        "warmup_s": warmup,
        "rss_slope_mb_per_h": slope,
        "rss_mib": {"min": min(rss_mib), "max": max(rss_mib), "end": rss_mib[-1]} if rss_mib else None,
        "gateway_cpu_percent": cpu,
        "sent": sum(r["sent"] for r in results.values()),
        "acked": sum(r.get("acked") or 0 for r in results.values()),
        "received": sum(r.get("received") or 0 for r in results.values()),
        "lost": sum(r.get("lost") or 0 for r in results.values()),
        "duplicates": sum(r.get("duplicates") or 0 for r in results.values()),
        "sims": results,
        "commands": {k: v[0] for k, v in sims.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}",
        "gateway_version": subprocess.run([gw_bin, "--version"], capture_output=True,
                                          text=True).stdout.strip(),
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    png = plot(args.out, work, samples_csv, outages, slope, warmup)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"""# Reference-load soak, {args.duration / 60:.0f} minutes at {args.speed:g}x

{summary["simulated_hours"]:.1f} simulated hours: {HEARTBEAT_DEVICES} devices x 1 msg/{HEARTBEAT_PERIOD_S:g} s
plus {TELEMETRY_DEVICES} devices x 1 msg/{TELEMETRY_PERIOD_S:g} s, a {OUTAGE_LENGTH_S // 60}-minute cloud
outage every {OUTAGE_EVERY_S // 3600} h (the first after {FIRST_OUTAGE_S // 3600} h), all {args.speed:g}x faster.
Machine: {summary["machine"]}. Gateway: `{summary["gateway_version"].splitlines()[0] if summary["gateway_version"] else "?"}`.

| sent | acked | received | lost | duplicates | RSS slope after {warmup / 60:.0f} min | RSS min / max / end (MiB) | gateway CPU |
|---|---|---|---|---|---|---|---|
| {summary["sent"]} | {summary["acked"]} | {summary["received"]} | {summary["lost"]} | {summary["duplicates"]} | {slope:+.3f} MB/h | {summary["rss_mib"]["min"]:.1f} / {summary["rss_mib"]["max"]:.1f} / {summary["rss_mib"]["end"]:.1f} | {cpu or 0:.0f}% of one core |

Outages (real seconds from the start): {", ".join(f"{a:.0f}-{b:.0f}" for a, b in outages) or "none"}.
Samples: samples.csv{"; plot: rss.png" if png else ""}.
""")
    log(f"sent {summary['sent']} received {summary['received']} lost {summary['lost']} "
        f"duplicates {summary['duplicates']}; RSS slope {slope:+.3f} MB/h; results in {args.out}")
    return 0 if summary["lost"] == 0 else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        cleanup()
