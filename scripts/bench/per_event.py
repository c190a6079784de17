#!/usr/bin/env python3
"""Per-event cost of fieldgate's hot path (issue 16), beside the Mosquitto bridge.

One run: a fresh mosquitto as the cloud, a fresh gateway (or, with --bridge, a mosquitto
bridging devices/# to the cloud), and fieldgate-sim sending from DEVICES devices at RATE
messages/s each for DURATION seconds and subscribing to the cloud. Over a steady window
(from second 4, up to 10 s) it reads the gateway process's CPU from /proc and, when the
gateway was built with `--features count-allocations`, its heap allocations from
/metrics, and divides both by the events the gateway sent upstream in the window.

  scripts/bench/per_event.py --label u10k --devices 1000 --rate 10
  scripts/bench/per_event.py --label b60k --devices 100 --rate 600 --batch
  scripts/bench/per_event.py --label bridge --devices 1000 --rate 10 --bridge

Prints one JSON line: rate, cpu_pct, us_per_event (user and system share), allocations and
bytes allocated per event (null without the feature), lost, p50/p99 latency in ms and the
load average at the end of the window. Binaries: $GW and $SIM, default target/release.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def scrape(api):
    """The gateway's counters that this benchmark divides: {name: value}."""
    wanted = ("fieldgate_sent_events_total", "fieldgate_heap_allocations_total",
              "fieldgate_heap_allocated_bytes_total")
    text = urllib.request.urlopen(f"http://127.0.0.1:{api}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def gateway_config(work, api, tcp, cloud, batch):
    batching = ('batch_max_events = 200\nbatch_max_delay = "5ms"\n'
                'batch_topic = "gateways/{gateway}/batch"\n') if batch else ""
    return f'''[gateway]
id = "gw-bench"
data_dir = "{work}/data"
shutdown_grace = "5s"
[log]
level = "warn"
[api]
address = "127.0.0.1:{api}"
[sources.devices]
type = "tcp"
address = "127.0.0.1:{tcp}"
max_connections = 19000
[sinks.cloud]
type = "mqtt"
inputs = ["devices"]
url = "mqtt://127.0.0.1:{cloud}"
client_id = "gw-bench"
qos = 1
{batching}
[sinks.cloud.buffer]
type = "disk"
max_size = "1GiB"
'''


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="run")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=10, help="messages/s per device")
    parser.add_argument("--duration", type=int, default=20, help="seconds of sending")
    parser.add_argument("--batch", action="store_true", help="batch 200 events / 5 ms upstream")
    parser.add_argument("--bridge", action="store_true", help="measure a Mosquitto bridge instead")
    args = parser.parse_args()
    gw_bin = os.environ.get("GW", f"{ROOT}/target/release/fieldgate")
    sim_bin = os.environ.get("SIM", f"{ROOT}/target/release/fieldgate-sim")

    work = tempfile.mkdtemp(prefix=f"fieldgate-per-event-{args.label}-")
    children = []
    try:
        cloud, tcp, api = free_port(), free_port(), free_port()
        broker_conf = (f"listener {cloud} 127.0.0.1\nallow_anonymous true\n"
                       "max_queued_messages 0\nmax_inflight_messages 0\n")
        open(f"{work}/cloud.conf", "w").write(broker_conf)
        children.append(subprocess.Popen(["mosquitto", "-c", f"{work}/cloud.conf"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.3)
        if args.bridge:
            edge = free_port()
            open(f"{work}/edge.conf", "w").write(
                f"listener {edge} 127.0.0.1\nallow_anonymous true\n"
                "max_queued_messages 0\nmax_inflight_messages 0\n"
                f"connection cloud\naddress 127.0.0.1:{cloud}\ntopic devices/# out 1\n"
                "cleansession false\nclientid edge-bridge\n")
            gateway = subprocess.Popen(["mosquitto", "-c", f"{work}/edge.conf"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            target = ["mqtt", "--url", f"mqtt://127.0.0.1:{edge}", "--qos", "1",
                      "--sub-topic", "devices/#"]
        else:
            open(f"{work}/gw.toml", "w").write(gateway_config(work, api, tcp, cloud, args.batch))
            gateway = subprocess.Popen([gw_bin, "run", "--config", f"{work}/gw.toml"],
                                       stdout=subprocess.DEVNULL,
                                       stderr=open(f"{work}/gw.log", "w"))
            target = ["tcp", "--target", f"127.0.0.1:{tcp}", "--sub-topic", "gateways/#"]
        children.append(gateway)
        time.sleep(1.5)
        sim = subprocess.Popen(
            [sim_bin, *target, "--devices", str(args.devices), "--rate", str(args.rate),
             "--duration", str(args.duration), "--subscribe", f"mqtt://127.0.0.1:{cloud}",
             "--drain-timeout", "30"],
            stdout=subprocess.PIPE, stderr=open(f"{work}/sim.err", "w"))
        children.append(sim)
        time.sleep(4)

        window = max(2, min(10, args.duration - 6))
        t0, (user0, sys0) = time.monotonic(), cpu_ticks(gateway.pid)
        before = {} if args.bridge else scrape(api)
        time.sleep(window)
        t1, (user1, sys1) = time.monotonic(), cpu_ticks(gateway.pid)
        after = {} if args.bridge else scrape(api)
        load = os.getloadavg()[0]
        out, _ = sim.communicate(timeout=args.duration + 120)
        try:
            result = json.loads(out.decode())
        except ValueError:
            result = {}

        elapsed = t1 - t0
        if args.bridge:
            # The bridge exposes no counter here: divide by what the simulator sent.
            events = (result.get("send_rate") or args.devices * args.rate) * elapsed
        else:
            events = after["fieldgate_sent_events_total"] - before["fieldgate_sent_events_total"]

        def per_event(name):
            if name not in after or events <= 0:
                return None
            return round((after[name] - before[name]) / events, 2)

        cpu_s = (user1 - user0 + sys1 - sys0) / 100
        latency = result.get("latency_us") or {}
        print(json.dumps({
            "label": args.label,
            "rate": round(events / elapsed),
            "cpu_pct": round(100 * cpu_s / elapsed, 1),
            "us_per_event": round(1e6 * cpu_s / events, 2) if events else None,
            "user_pct": round((user1 - user0) / elapsed, 1),
            "sys_pct": round((sys1 - sys0) / elapsed, 1),
            "allocations_per_event": per_event("fieldgate_heap_allocations_total"),
            "bytes_allocated_per_event": per_event("fieldgate_heap_allocated_bytes_total"),
            "lost": result.get("lost"),
            "p50_ms": (latency.get("p50") or 0) / 1000,
            "p99_ms": (latency.get("p99") or 0) / 1000,
            "load": round(load, 2),
        }))
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        subprocess.run(["rm", "-rf", work], check=False)


if __name__ == "__main__":
    sys.exit(main())
