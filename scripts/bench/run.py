#!/usr/bin/env python3
"""fieldgate benchmark runner: fieldgate beside Mosquitto, same run, same machine.

Started by scripts/bench.sh (which builds the binaries and copies them to a private
directory). Python 3 stdlib only. Every process it starts is recorded and killed by PID
on exit; nothing is killed by name. Ports are picked free at run time in 30000-39999.
Results go to a JSON file after every scenario, and render.py turns them into the
tables of docs/BENCHMARKS.md.
"""

import argparse
import atexit
import datetime
import http.client
import json
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# --------------------------------------------------------------------------- processes

STARTED = []  # Popen objects we started; the only things we ever kill


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start(cmd, logfile, **kw):
    """Starts a child in its own session (so a terminal ^C reaches us, not it)."""
    out = open(logfile, "ab")
    proc = subprocess.Popen(cmd, stdout=kw.pop("stdout", out), stderr=out,
                            start_new_session=True, **kw)
    proc._bench_log = out
    STARTED.append(proc)
    return proc


def stop(proc, sig=signal.SIGTERM, timeout=10):
    """Stops one child we started, by PID; SIGKILL if it does not exit in time."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    try:
        proc._bench_log.close()
    except Exception:
        pass
    if proc in STARTED:
        STARTED.remove(proc)


def cleanup():
    for proc in list(STARTED):
        stop(proc, signal.SIGKILL, 5)


def on_signal(signum, _frame):
    log(f"signal {signum}: cleaning up")
    cleanup()
    sys.exit(130)


atexit.register(cleanup)
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGHUP, on_signal)

# --------------------------------------------------------------------------- /proc


def proc_status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_kib(pid):
    return proc_status(pid, "VmRSS")


def hwm_kib(pid):
    return proc_status(pid, "VmHWM")


def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except OSError:
        return None


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class CpuMeter:
    """CPU% of one process over an interval: utime+stime delta / wall time."""

    def __init__(self, pid):
        self.pid = pid
        self.t0 = time.monotonic()
        self.c0 = cpu_ticks(pid)

    def percent(self):
        c1 = cpu_ticks(self.pid)
        wall = time.monotonic() - self.t0
        if c1 is None or self.c0 is None or wall <= 0:
            return None
        return round(100.0 * (c1 - self.c0) / CLK_TCK / wall, 1)


# --------------------------------------------------------------------------- network

USED_PORTS = set()


def free_port():
    for _ in range(1000):
        port = random.randint(30000, 39999)
        if port in USED_PORTS:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        # nobody listening on it on any address either
        c = socket.socket()
        c.settimeout(0.2)
        try:
            c.connect(("127.0.0.1", port))
            c.close()
            continue
        except OSError:
            pass
        USED_PORTS.add(port)
        return port
    raise RuntimeError("no free port in 30000-39999")


def port_open(port, timeout=0.2):
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_until(pred, timeout, step=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    log(f"timed out after {timeout}s waiting for {what}")
    return False


def http_get(port, path, timeout=1.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    except OSError:
        return None, ""
    finally:
        conn.close()


def metric(api_port, name):
    """Sum of every series of one metric (None when /metrics does not answer)."""
    status, body = http_get(api_port, "/metrics", 2.0)
    if status != 200:
        return None
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            try:
                total += float(line.rsplit(None, 1)[1])
            except (ValueError, IndexError):
                pass
    return total


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.mode == "quick"
        self.work = args.work
        self.bin = args.bin
        self.gw_bin = os.path.join(args.bin, "fieldgate")
        self.sim_bin = os.path.join(args.bin, "fieldgate-sim")
        self.out = args.out
        self.counter = 0
        self.results = {
            "mode": args.mode,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_info(args.root),
            "commands": {},
            "scenarios": {},
        }
        self.runs = 1 if self.quick else 3
        self.noted = set()  # command labels recorded by this run

    # ---- bookkeeping

    def save(self):
        self.results["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.results["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1)
        os.replace(tmp, self.out)
        if self.args.render:
            subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "render.py"),
                            self.out, self.args.render], check=False)

    def note_cmd(self, label, cmd):
        # The first use in this run wins (commands kept from an earlier run are replaced).
        if label not in self.noted:
            self.noted.add(label)
            self.results["commands"][label] = " ".join(shlex.quote(c) for c in cmd)

    def note_text(self, label, text):
        if label not in self.noted:
            self.noted.add(label)
            self.results["commands"][label] = text

    def path(self, name):
        self.counter += 1
        return os.path.join(self.work, f"{self.counter:03d}-{name}")

    # ---- mosquitto

    def mosquitto(self, name, extra="", port=None, persist=None):
        port = port or free_port()
        conf = self.path(f"{name}.conf")
        lines = [f"listener {port} 127.0.0.1", "allow_anonymous true",
                 "max_queued_messages 0", "max_inflight_messages 0"]
        if persist:
            os.makedirs(persist, exist_ok=True)
            lines += ["persistence true", f"persistence_location {persist}/"]
            if os.geteuid() == 0:
                # Started as root, mosquitto switches to the user "mosquitto", which cannot
                # write into the 0700 work directory: it would never save its database.
                lines.append("user root")
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n" + extra)
        proc = start(["mosquitto", "-c", conf], conf + ".log")
        self.note_cmd(f"mosquitto ({name})", ["mosquitto", "-c", f"{name}.conf"])
        self.note_text(f"conf: {name}", open(conf).read())
        if not wait_until(lambda: port_open(port), 10, what=f"mosquitto {name} on {port}"):
            raise RuntimeError(f"mosquitto {name} did not start, see {conf}.log")
        return proc, port, conf

    def bridge_conf(self, cloud_port):
        # "restart_timeout 1 1": mosquitto 2.0.11 treats a single value as the base of its
        # jittered backoff (cap 30 s; retries seen 5, 9-11, 23-29 s apart), not as a
        # constant; base = cap = 1 retries about every 2 s.
        return ("connection cloud\n"
                f"address 127.0.0.1:{cloud_port}\n"
                "topic devices/# out 1\n"
                "cleansession false\n"
                "restart_timeout 1 1\n")

    # ---- fieldgate

    def gateway(self, name, cloud_port, batch=False, ack=False, max_size="1GiB", data=None,
                ports=None, qos=1, clean_session=False, transforms=None):
        tcp, api = ports or (free_port(), free_port())
        data = data or self.path(f"{name}-data")
        conf = os.path.join(self.work, f"gw-{name}-{tcp}.toml")
        batch_lines = ('batch_max_events = 200\nbatch_max_delay = "5ms"\n'
                       'batch_topic = "gateways/{gateway}/batch"\n') if batch else ""
        text = f"""[gateway]
id = "gw-bench"
data_dir = "{data}"
shutdown_grace = "5s"

[log]
level = "warn"

[api]
address = "127.0.0.1:{api}"

[sources.devices]
type = "tcp"
address = "127.0.0.1:{tcp}"
max_connections = 19000
ack = {"true" if ack else "false"}

{transforms or ""}
[sinks.cloud]
type = "mqtt"
inputs = ["{"normalise" if transforms else "devices"}"]
url = "mqtt://127.0.0.1:{cloud_port}"
client_id = "gw-bench"
qos = {qos}
clean_session = {"true" if clean_session else "false"}
reconnect_min = "1s"
reconnect_max = "1s"
{batch_lines}
[sinks.cloud.buffer]
type = "disk"
max_size = "{max_size}"
"""
        with open(conf, "w") as f:
            f.write(text)
        label = f"fieldgate config ({'batch' if batch else 'no batch'}{', ack' if ack else ''}{', filter+remap' if transforms else ''}, max_size {max_size})"
        self.note_text(label, re.sub(r"\d{5}", "PORT", text.replace(data, "DATA")))
        cmd = [self.gw_bin, "run", "--config", conf]
        self.note_cmd("fieldgate", ["fieldgate", "run", "--config", "gw.toml"])
        t0 = time.monotonic()
        proc = start(cmd, conf + ".log")
        ok = wait_until(lambda: http_get(api, "/readyz", 0.5)[0] == 200 or proc.poll() is not None,
                        30, 0.01, what="fieldgate /readyz")
        if not ok or proc.poll() is not None:
            raise RuntimeError(f"fieldgate did not become ready, see {conf}.log")
        proc._ready_s = time.monotonic() - t0
        return proc, tcp, api, data, conf

    # ---- the simulator

    def sim(self, label, argv, timeout):
        cmd = [self.sim_bin] + argv
        self.note_cmd(label, ["fieldgate-sim"] + [re.sub(r"(127\.0\.0\.1:)\d+", r"\1PORT", a) for a in argv])
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        errlog = os.path.join(self.work, "sim.log")
        with open(errlog, "ab") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
            STARTED.append(proc)
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop(proc, signal.SIGKILL)
                log(f"sim {label} exceeded {timeout}s, killed")
                return {"error": f"timeout {timeout}s"}
            finally:
                if proc in STARTED:
                    STARTED.remove(proc)
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            result = json.loads(out)
        except ValueError:
            log(f"sim {label}: exit {proc.returncode}, no JSON (see {errlog})")
            return {"error": f"exit {proc.returncode}", "wall_s": wall}
        result["wall_s"] = round(wall, 3)
        cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        result["sim_cpu_pct"] = round(100 * cpu / wall, 1) if wall > 0 else None
        result["exit"] = proc.returncode
        return result

    def sim_async(self, label, argv, timeout):
        """Runs the sim in a thread; returns (thread, holder dict)."""
        holder = {}

        def body():
            holder["result"] = self.sim(label, argv, timeout)

        th = threading.Thread(target=body, daemon=True)
        th.start()
        return th, holder

    # ======================================================================= scenarios

    def run_idle(self):
        hold = 6 if self.quick else 10
        counts = [1000, 10000]
        rows = []
        cloud, cloud_port, _ = self.mosquitto("cloud")
        for n in counts:
            for variant in ["connect only", "hello + 1 message"]:
                for run in range(self.runs):
                    gw, tcp, api, data, _ = self.gateway(f"idle{n}", cloud_port)
                    time.sleep(1.0)
                    before = rss_kib(gw.pid)
                    fd0 = fd_count(gw.pid)
                    argv = ["idle", "--target", f"127.0.0.1:{tcp}", "--devices", str(n),
                            "--hold", str(hold), "--heartbeat", "20s"]
                    if variant != "connect only":
                        argv += ["--hello", "--message"]
                    th, holder = self.sim_async(f"idle {variant}", argv, hold + 90)
                    ok = wait_until(lambda: fd_count(gw.pid) >= fd0 + n, 60, 0.05,
                                    what=f"{n} gateway connections")
                    time.sleep(2.0)
                    samples = []
                    for _ in range(4):
                        samples.append(rss_kib(gw.pid))
                        time.sleep(0.5)
                    held = max(s for s in samples if s)
                    conns = metric(api, "fieldgate_connections")
                    th.join(hold + 100)
                    res = holder.get("result", {})
                    stop(gw)
                    row = {"who": "fieldgate", "n": n, "variant": variant, "run": run,
                           "rss_before_kib": before, "rss_held_kib": held,
                           "per_conn_kib": round((held - before) / n, 3),
                           "connections_seen": conns, "all_connected": ok,
                           "sim_connected": res.get("peak_connected"),
                           "closed_by_peer": res.get("closed_by_peer"),
                           "connect_s": res.get("connect_s")}
                    rows.append(row)
                    log(f"idle fieldgate n={n} {variant}: {before} -> {held} KiB, "
                        f"{row['per_conn_kib']} KiB/conn (sim {res.get('peak_connected')})")
            # Mosquitto as a plain broker: N idle MQTT clients
            for run in range(self.runs):
                mq, mq_port, _ = self.mosquitto("broker")
                time.sleep(0.5)
                before = rss_kib(mq.pid)
                fd0 = fd_count(mq.pid)
                argv = ["mqtt", "--url", f"mqtt://127.0.0.1:{mq_port}", "--devices", str(n),
                        "--rate", "0.0001", "--duration", str(hold + 8), "--qos", "0"]
                th, holder = self.sim_async("idle mqtt clients (mosquitto)", argv, hold + 120)
                ok = wait_until(lambda: fd_count(mq.pid) >= fd0 + n, 60, 0.05,
                                what=f"{n} mosquitto connections")
                time.sleep(2.0)
                samples = []
                for _ in range(4):
                    samples.append(rss_kib(mq.pid))
                    time.sleep(0.5)
                held = max(s for s in samples if s)
                th.join(hold + 130)
                stop(mq)
                row = {"who": "mosquitto", "n": n, "variant": "MQTT CONNECT", "run": run,
                       "rss_before_kib": before, "rss_held_kib": held,
                       "per_conn_kib": round((held - before) / n, 3), "all_connected": ok}
                rows.append(row)
                log(f"idle mosquitto n={n}: {before} -> {held} KiB, {row['per_conn_kib']} KiB/conn")
            self.results["scenarios"]["idle"] = {"hold_s": hold, "rows": rows}
            self.save()
        stop(cloud)

    def run_load(self):
        duration = 15 if self.quick else 30
        rows = []
        for run in range(self.runs):
            # fieldgate
            cloud, cloud_port, _ = self.mosquitto("cloud")
            gw, tcp, api, data, _ = self.gateway("load", cloud_port)
            time.sleep(0.5)
            meter, cmeter = CpuMeter(gw.pid), CpuMeter(cloud.pid)
            res = self.sim("load: 1000 TCP devices x 10 msg/s -> fieldgate", [
                "tcp", "--target", f"127.0.0.1:{tcp}", "--devices", "1000", "--rate", "10",
                "--duration", str(duration), "--subscribe", f"mqtt://127.0.0.1:{cloud_port}",
                "--sub-topic", "gateways/#", "--drain-timeout", "30"], duration + 120)
            rows.append(self.load_row("fieldgate", run, res, meter.percent(), hwm_kib(gw.pid),
                                      rss_kib(gw.pid), cmeter.percent()))
            stop(gw)
            stop(cloud)
            # Mosquitto bridge
            cloud, cloud_port, _ = self.mosquitto("cloud")
            edge, edge_port, _ = self.mosquitto("edge-bridge", self.bridge_conf(cloud_port))
            time.sleep(1.5)  # bridge connects
            meter, cmeter = CpuMeter(edge.pid), CpuMeter(cloud.pid)
            res = self.sim("load: 1000 MQTT devices x 10 msg/s -> mosquitto bridge", [
                "mqtt", "--url", f"mqtt://127.0.0.1:{edge_port}", "--qos", "1", "--devices", "1000",
                "--rate", "10", "--duration", str(duration),
                "--subscribe", f"mqtt://127.0.0.1:{cloud_port}", "--sub-topic", "devices/#",
                "--drain-timeout", "30"], duration + 120)
            rows.append(self.load_row("mosquitto bridge", run, res, meter.percent(),
                                      hwm_kib(edge.pid), rss_kib(edge.pid), cmeter.percent()))
            stop(edge)
            stop(cloud)
            self.results["scenarios"]["load"] = {"duration_s": duration, "rows": rows}
            self.save()

    def load_row(self, who, run, res, cpu, hwm, rss, cloud_cpu):
        lat = res.get("latency_us") or {}
        row = {"who": who, "run": run, "sent": res.get("sent"), "received": res.get("received"),
               "lost": res.get("lost"), "duplicates": res.get("duplicates"),
               "send_rate": res.get("send_rate"), "p50_ms": ms(lat.get("p50")),
               "p99_ms": ms(lat.get("p99")), "p999_ms": ms(lat.get("p999")),
               "max_ms": ms(lat.get("max")), "cpu_pct": cpu, "hwm_kib": hwm, "rss_end_kib": rss,
               "cloud_cpu_pct": cloud_cpu, "sim_cpu_pct": res.get("sim_cpu_pct"),
               "error": res.get("error"), "drain_timed_out": res.get("drain_timed_out")}
        log(f"load {who}: p50 {row['p50_ms']} p99 {row['p99_ms']} ms, cpu {cpu}%, "
            f"hwm {hwm} KiB, lost {row['lost']}")
        return row

    def run_link(self):
        """The cloud link without batching (issue 8): 1,000 devices at 10 and 30 msg/s each,
        QoS 1, beside the Mosquitto bridge; CPU per delivered message; write syscalls per
        1,000 publishes (strace, separate short run); QoS 2 with and without the on-disk
        session state (clean_session false vs true)."""
        duration = 10 if self.quick else 20
        rows = []
        for run in range(self.runs):
            for rate in [10, 30]:
                for who in ["fieldgate", "mosquitto bridge"]:
                    rows.append(self.link_run(who, run, rate, duration, qos=1))
                    self.results["scenarios"]["link"] = {"duration_s": duration, "rows": rows}
                    self.save()
            for clean in [False, True]:
                rows.append(self.link_run("fieldgate", run, 10, duration, qos=2, clean=clean))
                self.results["scenarios"]["link"] = {"duration_s": duration, "rows": rows}
                self.save()
        self.results["scenarios"]["link"]["syscalls"] = self.link_syscalls()
        self.save()

    def link_run(self, who, run, rate, duration, qos, clean=False):
        load0 = os.getloadavg()[0]
        cloud, cloud_port, _ = self.mosquitto("cloud")
        if who.startswith("fieldgate"):
            transforms = GRAPH_TRANSFORMS if "filter" in who else None
            gw, tcp, _api, _data, _ = self.gateway(f"link-{rate}-{qos}-{clean}", cloud_port,
                                                  qos=qos, clean_session=clean,
                                                  transforms=transforms)
            proc = gw
            argv = ["tcp", "--target", f"127.0.0.1:{tcp}", "--sub-topic", "gateways/#"]
        else:
            edge, edge_port, _ = self.mosquitto("edge-bridge", self.bridge_conf(cloud_port))
            time.sleep(1.5)  # bridge connects
            proc = edge
            argv = ["mqtt", "--url", f"mqtt://127.0.0.1:{edge_port}", "--qos", str(qos),
                    "--sub-topic", "devices/#"]
        time.sleep(0.5)
        t0, c0 = time.monotonic(), cpu_ticks(proc.pid)
        res = self.sim(f"link: 1000 devices x {rate} msg/s -> {who} (QoS {qos})", argv + [
            "--devices", "1000", "--rate", str(rate), "--duration", str(duration),
            "--subscribe", f"mqtt://127.0.0.1:{cloud_port}", "--drain-timeout", "30"],
            duration + 120)
        c1, wall = cpu_ticks(proc.pid), time.monotonic() - t0
        cpu_s = (c1 - c0) / CLK_TCK if c1 is not None and c0 is not None else None
        received = res.get("received") or 0
        lat = res.get("latency_us") or {}
        row = {"who": who, "run": run, "rate_per_device": rate, "qos": qos,
               "session_on_disk": (who.startswith("fieldgate") and qos == 2 and not clean),
               "sent": res.get("sent"), "received": received, "lost": res.get("lost"),
               "duplicates": res.get("duplicates"), "send_rate": res.get("send_rate"),
               "p50_ms": ms(lat.get("p50")), "p99_ms": ms(lat.get("p99")),
               "cpu_pct": round(100 * cpu_s / wall, 1) if cpu_s is not None else None,
               "cpu_us_per_msg": round(1e6 * cpu_s / received, 1) if cpu_s and received else None,
               "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2),
               "error": res.get("error")}
        log(f"link {who} {rate}/s QoS {qos}{' clean' if clean else ''}: lost {row['lost']}, "
            f"p50 {row['p50_ms']} p99 {row['p99_ms']} ms, {row['cpu_us_per_msg']} us/msg, "
            f"load {row['load_start']}->{row['load_end']}")
        stop(proc)
        stop(cloud)
        return row

    def run_graph(self):
        """The component model (issue 10): CPU per event with a filter and a remap in the
        path against the plain path and the Mosquitto bridge (1,000 devices x 10 msg/s,
        QoS 1); then reload times of a config with 10 sources and 10 sinks."""
        duration = 10 if self.quick else 20
        rows = []
        out = {"duration_s": duration, "rows": rows}
        for run in range(self.runs):
            for who in ["fieldgate", "fieldgate filter+remap", "mosquitto bridge"]:
                rows.append(self.link_run(who, run, 10, duration, qos=1))
                self.results["scenarios"]["graph"] = out
                self.save()
        out["reload"] = self.reload_times()
        self.results["scenarios"]["graph"] = out
        self.save()

    def reload_times(self):
        """POST /api/v1/config/reload round trips on a gateway with 10 TCP sources and 10
        file sinks: unchanged, one sink added, every source and sink changed."""
        admin = "bench-admin"
        ports = [free_port() for _ in range(10)]
        api = free_port()
        data = self.path("reload-data")

        def config(extra_sink=False, variant=0):
            parts = [f'[gateway]\nid = "gw-reload"\ndata_dir = "{data}"\n\n[log]\nlevel = "warn"\n\n'
                     f'[api]\naddress = "127.0.0.1:{api}"\nadmin_token = "{admin}"\n']
            for i, port in enumerate(ports):
                parts.append(f'[sources.s{i}]\ntype = "tcp"\naddress = "127.0.0.1:{port}"\n'
                             f'max_errors = {10 + variant}\n')
            for i in range(10 + (1 if extra_sink else 0)):
                parts.append(f'[sinks.k{i}]\ntype = "file"\ninputs = ["s{i % 10}"]\n'
                             f'max_files = {10 + variant}\n')
            return "\n".join(parts)

        conf = os.path.join(self.work, "gw-reload.toml")
        with open(conf, "w") as f:
            f.write(config())
        self.note_text("fieldgate config (reload: 10 sources, 10 sinks)",
                       re.sub(r"\d{5}", "PORT", config().replace(data, "DATA")))
        proc = start([self.gw_bin, "run", "--config", conf], conf + ".log")
        if not wait_until(lambda: http_get(api, "/readyz", 0.5)[0] == 200, 30, 0.02,
                          what="fieldgate /readyz"):
            stop(proc)
            return {"error": "gateway not ready"}

        def reload_ms(text):
            with open(conf + ".new", "w") as f:
                f.write(text)
            os.replace(conf + ".new", conf)
            t0 = time.monotonic()
            c = http.client.HTTPConnection("127.0.0.1", api, timeout=60)
            c.request("POST", "/api/v1/config/reload", headers={"Authorization": f"Bearer {admin}"})
            r = c.getresponse()
            body = r.read()
            c.close()
            elapsed = 1000 * (time.monotonic() - t0)
            if r.status != 200:
                raise RuntimeError(f"reload answered {r.status}: {body[:200]!r}")
            return round(elapsed, 1)

        cases = {"unchanged": [], "one sink added": [], "all 20 changed": []}
        reps = 3 if self.quick else 7
        variant = 0
        for _ in range(reps):
            cases["unchanged"].append(reload_ms(config(variant=variant)))
            cases["one sink added"].append(reload_ms(config(extra_sink=True, variant=variant)))
            variant += 1
            # Every source and sink changed, and the extra sink removed again.
            cases["all 20 changed"].append(reload_ms(config(variant=variant)))
        stop(proc)
        result = {name: {"median_ms": statistics.median(v), "runs_ms": v} for name, v in cases.items()}
        log(f"reload: {result}")
        return result

    def link_syscalls(self):
        """Write-family syscalls of the gateway per 1,000 delivered publishes (strace -c)."""
        if not shutil.which("strace"):
            return {"error": "strace not installed"}
        cloud, cloud_port, _ = self.mosquitto("cloud")
        gw, tcp, _api, _data, _ = self.gateway("link-strace", cloud_port)
        time.sleep(0.5)
        out = self.path("strace.txt")
        tracer = start(["strace", "-f", "-c", "-o", out, "-e",
                        "trace=write,writev,sendto,sendmsg,pwrite64", "-p", str(gw.pid)],
                       out + ".log")
        time.sleep(1.0)
        res = self.sim("link: strace run, 1000 devices x 10 msg/s", [
            "tcp", "--target", f"127.0.0.1:{tcp}", "--devices", "1000", "--rate", "10",
            "--duration", "8", "--subscribe", f"mqtt://127.0.0.1:{cloud_port}",
            "--sub-topic", "gateways/#", "--drain-timeout", "30"], 120)
        stop(tracer, signal.SIGINT)
        stop(gw)
        stop(cloud)
        calls = {}
        for line in open(out).read().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[-1] in ("write", "writev", "sendto", "sendmsg", "pwrite64"):
                calls[parts[-1]] = int(parts[3]) if parts[3].isdigit() else int(parts[4])
        received = res.get("received") or 0
        total = sum(calls.values())
        return {"calls": calls, "received": received,
                "per_1000": round(1000 * total / received, 1) if received else None}

    def run_ramp(self):
        step_s = 4 if self.quick else 8
        devices = 100
        plans = [
            ("fieldgate, no batching", False,
             [5000, 10000, 15000, 20000, 25000, 30000, 40000, 50000]),
            ("fieldgate, batching 200/5ms", True,
             [10000, 20000, 40000, 60000, 80000, 100000, 120000, 150000, 200000]),
            ("mosquitto bridge", None,
             [5000, 10000, 15000, 20000, 25000, 30000, 40000, 50000]),
        ]
        out = {"step_s": step_s, "devices": devices, "variants": []}
        self.results["scenarios"]["ramp"] = out
        for name, batch, steps in plans:
            cloud, cloud_port, _ = self.mosquitto("cloud")
            if batch is None:
                proc, edge_port, _ = self.mosquitto("edge-bridge", self.bridge_conf(cloud_port))
                time.sleep(1.5)
            else:
                proc, tcp, api, data, _ = self.gateway("ramp", cloud_port, batch=batch)
            variant = {"name": name, "steps": [], "best": None, "stopped_by": None}
            out["variants"].append(variant)
            for rate in steps:
                per_dev = rate / devices
                attempt = 0
                while True:
                    attempt += 1
                    meter = CpuMeter(proc.pid)
                    if batch is None:
                        argv = ["mqtt", "--url", f"mqtt://127.0.0.1:{edge_port}", "--qos", "1",
                                "--devices", str(devices), "--rate", f"{per_dev:g}",
                                "--duration", str(step_s),
                                "--subscribe", f"mqtt://127.0.0.1:{cloud_port}",
                                "--sub-topic", "devices/#", "--drain-timeout", "15"]
                        label = "ramp step -> mosquitto bridge"
                    else:
                        argv = ["tcp", "--target", f"127.0.0.1:{tcp}", "--devices", str(devices),
                                "--rate", f"{per_dev:g}", "--duration", str(step_s),
                                "--subscribe", f"mqtt://127.0.0.1:{cloud_port}",
                                "--sub-topic", "gateways/#", "--drain-timeout", "15"]
                        label = "ramp step -> fieldgate"
                    res = self.sim(label, argv, step_s + 90)
                    cpu = meter.percent()
                    lat = res.get("latency_us") or {}
                    step = {"offered": rate, "attempt": attempt, "sent": res.get("sent"),
                            "send_rate": res.get("send_rate"), "received": res.get("received"),
                            "lost": res.get("lost"), "receive_rate": res.get("receive_rate"),
                            "p50_ms": ms(lat.get("p50")), "p99_ms": ms(lat.get("p99")),
                            "cpu_pct": cpu, "sim_cpu_pct": res.get("sim_cpu_pct"),
                            "drain_timed_out": res.get("drain_timed_out"),
                            "error": res.get("error")}
                    why = []
                    if res.get("error"):
                        why.append(res["error"])
                    if res.get("lost") is None or res.get("lost") != 0:
                        why.append(f"lost {res.get('lost')}")
                    if (res.get("drain_s") or 0) > 2.0 or res.get("drain_timed_out"):
                        why.append(f"fell behind (drain {res.get('drain_s')} s after sending)")
                    if (res.get("send_rate") or 0) < 0.9 * rate:
                        why.append(f"generator only sent {res.get('send_rate')}/s")
                    step["drain_s"] = res.get("drain_s")
                    step["keeps_up"] = not why
                    if step["p99_ms"] is None or step["p99_ms"] > 100:
                        why.append(f"p99 {step['p99_ms']} ms")
                    step["pass"] = not why
                    step["why"] = ", ".join(why)
                    variant["steps"].append(step)
                    log(f"ramp {name} {rate}/s try {attempt}: sent {step['send_rate']}/s "
                        f"p99 {step['p99_ms']} ms lost {step['lost']} drain {step['drain_s']} s cpu {cpu}% "
                        f"-> {'PASS' if step['pass'] else ('keeps up, ' if step['keeps_up'] else 'FAIL ') + step['why']}")
                    self.save()
                    if step["keeps_up"] or attempt >= 2:
                        break
                    time.sleep(2)  # let the upstream settle before the retry
                summary = {"offered": rate, "send_rate": step["send_rate"],
                           "p50_ms": step["p50_ms"], "p99_ms": step["p99_ms"], "cpu_pct": cpu}
                if step["pass"]:
                    variant["best"] = summary
                if not step["keeps_up"]:
                    variant["stopped_by"] = f"{rate}/s: {step['why']}"
                    break
                variant["best_keeps_up"] = summary
                time.sleep(1)
            if batch is not None:
                variant["hwm_kib"] = hwm_kib(proc.pid)
            stop(proc)
            stop(cloud)
            self.save()

    # ---- backlog drain

    def subscriber_register(self, port, client_id, topic):
        cmd = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-c", "-i", client_id,
               "-q", "1", "-t", topic, "-E"]
        subprocess.run(cmd, timeout=10, check=True, stdout=subprocess.DEVNULL)

    def count_arrivals(self, port, client_id, topic, expected, t0, timeout):
        """Persistent-session subscriber; counts distinct (device, seq) until expected."""
        wait_until(lambda: port_open(port), 20, 0.005, what="cloud back")
        cmd = ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-c",
               "-i", client_id, "-q", "1", "-t", topic]
        self.note_cmd("drain subscriber", cmd)
        proc = start(cmd, self.path("drain-sub.log"), stdout=subprocess.PIPE)
        pat = re.compile(rb'\{"device":"([^"]+)","seq":(\d+)')
        seen = set()
        first = last = None
        dups = 0
        done = threading.Event()

        def reader():
            nonlocal first, last, dups
            for line in proc.stdout:
                now = time.monotonic()
                for dev, seq in pat.findall(line):
                    key = (dev, seq)
                    if key in seen:
                        dups += 1
                        continue
                    seen.add(key)
                    if first is None:
                        first = now
                    last = now
                if len(seen) >= expected:
                    done.set()
                    return

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        done.wait(timeout)
        stop(proc, signal.SIGTERM, 5)
        th.join(5)
        return {"received": len(seen), "duplicates": dups,
                "first_s": round(first - t0, 3) if first else None,
                "all_s": round(last - t0, 3) if (last and len(seen) >= expected) else None,
                "last_s": round(last - t0, 3) if last else None,
                "complete": len(seen) >= expected}

    def run_drain(self):
        total = 100000
        devices = 100
        per = total // devices
        rows = []
        timeout = 120 if self.quick else 240
        for run in range(self.runs):
            for who in ["fieldgate", "fieldgate, batching", "mosquitto bridge"]:
                persist = self.path("cloud-db")
                cloud, cloud_port, _ = self.mosquitto("cloud-persistent", persist=persist)
                topic = "devices/#" if who == "mosquitto bridge" else "gateways/#"
                sub_id = f"bench-drain-{os.getpid()}-{run}-{len(rows)}"
                self.subscriber_register(cloud_port, sub_id, topic)
                if who == "mosquitto bridge":
                    target, edge_port, _ = self.mosquitto("edge-bridge", self.bridge_conf(cloud_port))
                    time.sleep(1.5)  # let the bridge connect once (creates its session)
                else:
                    target, tcp, api, data, _ = self.gateway("drain", cloud_port, ack=True,
                                                             batch=(who != "fieldgate"))
                    time.sleep(1.5)
                stop(cloud)  # outage starts (SIGTERM: mosquitto saves its sessions)
                time.sleep(0.5)
                if who == "mosquitto bridge":
                    res = self.sim("drain fill -> mosquitto bridge (cloud down)", [
                        "mqtt", "--url", f"mqtt://127.0.0.1:{edge_port}", "--qos", "1",
                        "--devices", str(devices), "--rate", "0", "--messages", str(per),
                        "--duration", "120"], 180)
                    buffered = None
                else:
                    res = self.sim("drain fill -> fieldgate, ack mode (cloud down)", [
                        "tcp", "--target", f"127.0.0.1:{tcp}", "--ack", "--devices", str(devices),
                        "--rate", "0", "--messages", str(per), "--duration", "120"], 180)
                    buffered = metric(api, "fieldgate_buffer_events")
                fill_rate = res.get("send_rate")
                log(f"drain {who}: sent {res.get('sent')} acked {res.get('acked')} "
                    f"({fill_rate}/s), buffered {buffered}")
                meter = CpuMeter(target.pid)
                t0 = time.monotonic()
                cloud, _, _ = self.mosquitto("cloud-persistent", port=cloud_port, persist=persist)
                arr = self.count_arrivals(cloud_port, sub_id, topic, res.get("sent") or total, t0,
                                          timeout)
                cpu = meter.percent()
                row = {"who": who, "run": run, "sent": res.get("sent"), "acked": res.get("acked"),
                       "fill_rate": fill_rate, "buffered_events": buffered, "cpu_pct": cpu,
                       "drain_rate": (round(arr["received"] / (arr["last_s"] - arr["first_s"]))
                                      if arr["first_s"] is not None and arr["last_s"]
                                      and arr["last_s"] > arr["first_s"] else None),
                       **arr}
                rows.append(row)
                log(f"drain {who}: received {arr['received']}/{res.get('sent')} first "
                    f"{arr['first_s']} s, all {arr['all_s']} s, dups {arr['duplicates']}")
                stop(target)
                stop(cloud)
                self.results["scenarios"]["drain"] = {"total": total, "devices": devices,
                                                      "rows": rows}
                self.save()

    # ---- upstream outage under load

    def outage_subscriber(self, port, client_id, topic, seen, lock):
        """One mosquitto_sub (persistent session) feeding `seen`: (device, seq) ->
        (arrival wall time, send time from the payload's "t", µs). Returns (proc, thread,
        stats dict with the duplicates it saw)."""
        cmd = ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-c",
               "-i", client_id, "-q", "1", "-t", topic]
        self.note_cmd("outage subscriber", [c if c != str(port) else "PORT" for c in cmd])
        proc = start(cmd, self.path("outage-sub.log"), stdout=subprocess.PIPE)
        pat = re.compile(rb'\{"device":"([^"]+)","seq":(\d+)(?:,"t":(\d+))?')
        stats = {"duplicates": 0}

        def reader():
            for line in proc.stdout:
                now = time.time()
                with lock:
                    for dev, seq, t in pat.findall(line):
                        key = (dev, int(seq))
                        if key in seen:
                            stats["duplicates"] += 1
                        else:
                            seen[key] = (now, int(t) / 1e6 if t else None)

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        return proc, th, stats

    def sampler(self, fn, interval):
        """Calls fn() every `interval` s in a thread until the returned event is set;
        the samples (wall time, value) go into the returned list."""
        samples, halt = [], threading.Event()

        def body():
            while not halt.is_set():
                v = fn()
                if v is not None:
                    samples.append((time.time(), v))
                halt.wait(interval)

        threading.Thread(target=body, daemon=True).start()
        return samples, halt

    def run_outage(self):
        devices, rate, duration = 500, 10, 60
        down_at, down_for = 15.0, 30.0
        drain_timeout = 90 if self.quick else 120
        rows = []
        for run in range(self.runs):
            for who in ["fieldgate", "fieldgate, batching", "mosquitto bridge"]:
                bridge = who == "mosquitto bridge"
                # Persistent cloud: the subscriber's session (and what is queued for it)
                # survives the restart, so the subscriber itself cannot lose messages.
                persist = self.path("outage-cloud-db")
                cloud, cloud_port, cloud_conf = self.mosquitto("cloud-persistent", persist=persist)
                topic = "devices/#" if bridge else "gateways/#"
                sub_id = f"bench-outage-{os.getpid()}-{run}-{len(rows)}"
                self.subscriber_register(cloud_port, sub_id, topic)
                seen, lock = {}, threading.Lock()
                sub, sub_th, sub_stats = self.outage_subscriber(cloud_port, sub_id, topic, seen, lock)
                edge_sys = None
                if bridge:
                    # max_queued_messages 0 (unlimited, in every conf) lets the edge queue
                    # the whole outage; sys_interval 1 publishes its store size every second.
                    target, edge_port, _ = self.mosquitto(
                        "edge-bridge-outage", self.bridge_conf(cloud_port) + "sys_interval 1\n")
                    time.sleep(1.5)  # the bridge connects once (creates its session)
                    backlog_samples = []
                    edge_sys = start(["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p",
                                      str(edge_port), "-t", "$SYS/broker/store/messages/count"],
                                     self.path("edge-sys.log"), stdout=subprocess.PIPE)

                    def sys_reader(p=edge_sys, out=backlog_samples):
                        for line in p.stdout:
                            try:
                                out.append((time.time(), int(line.strip())))
                            except ValueError:
                                pass

                    threading.Thread(target=sys_reader, daemon=True).start()
                    halt = None
                    argv = ["mqtt", "--url", f"mqtt://127.0.0.1:{edge_port}", "--qos", "1",
                            "--devices", str(devices), "--rate", str(rate),
                            "--duration", str(duration)]
                    label = "outage: 500 MQTT devices x 10 msg/s -> mosquitto bridge"
                else:
                    target, tcp, api, data, _ = self.gateway("outage", cloud_port, ack=True,
                                                             batch=(who != "fieldgate"))
                    time.sleep(1.5)
                    backlog_samples, halt = self.sampler(
                        lambda a=api: metric(a, "fieldgate_buffer_events"), 0.25)
                    argv = ["tcp", "--target", f"127.0.0.1:{tcp}", "--ack", "--devices",
                            str(devices), "--rate", str(rate), "--duration", str(duration)]
                    label = "outage: 500 TCP devices x 10 msg/s, ack mode -> fieldgate"
                meter = CpuMeter(target.pid)
                t_start = time.time()
                th, holder = self.sim_async(label, argv, duration + 180)
                time.sleep(max(0.0, t_start + down_at - time.time()))
                t_down = time.time()
                stop(cloud)  # SIGTERM; persistence: it saves the sessions on the way out
                stop(sub, signal.SIGTERM, 5)  # so that no two subscribers share the client id
                with open(cloud_conf + ".log", errors="replace") as fh:
                    saved = "Error saving" not in fh.read()
                if not saved:
                    log(f"outage {who}: the cloud broker could not save its database; the "
                        "subscriber's session will not survive the restart")
                sub_th.join(5)
                dups = sub_stats["duplicates"]
                log(f"outage {who}: cloud down at {t_down - t_start:.1f} s "
                    f"({len(seen)} arrived so far)")
                time.sleep(max(0.0, t_down + down_for - time.time()))
                t_up = time.time()
                cloud, _, _ = self.mosquitto("cloud-persistent", port=cloud_port, persist=persist)
                sub, sub_th, sub_stats = self.outage_subscriber(cloud_port, sub_id, topic, seen, lock)
                log(f"outage {who}: cloud up again at {t_up - t_start:.1f} s")
                th.join(duration + 200)
                res = holder.get("result", {})
                sent = res.get("sent") or 0
                t_sim_end = time.time()
                wait_until(lambda: len(seen) >= sent, drain_timeout, 0.05,
                           what=f"outage {who}: all {sent} messages upstream")
                time.sleep(1.0)  # late duplicates
                cpu = meter.percent()
                hwm = hwm_kib(target.pid)
                stop(sub, signal.SIGTERM, 5)
                sub_th.join(5)
                dups += sub_stats["duplicates"]
                if halt is not None:
                    halt.set()
                buffer_after = None if bridge else metric(api, "fieldgate_buffer_events")
                stop(edge_sys)
                stop(target)
                stop(cloud)
                with lock:
                    arrivals = dict(seen)
                row = {"who": who, "run": run, "sent": res.get("sent"), "acked": res.get("acked"),
                       "send_rate": res.get("send_rate"), "resent": res.get("resent"),
                       "nacked": res.get("nacked"), "disconnects": res.get("disconnects"),
                       "sim_error": res.get("error"), "received": len(arrivals),
                       "lost": (sent - len(arrivals)) if res.get("sent") is not None else None,
                       "duplicates": dups, "cpu_pct": cpu, "hwm_kib": hwm,
                       "down_at_s": round(t_down - t_start, 2), "up_at_s": round(t_up - t_start, 2),
                       "sim_end_s": round(t_sim_end - t_start, 2),
                       "buffer_events_after": buffer_after, "cloud_saved_session": saved,
                       "missing": missing_summary(arrivals, rate),
                       "backlog_metric": "edge $SYS/broker/store/messages/count" if bridge
                       else "fieldgate_buffer_events",
                       "peak_backlog": max((v for _, v in backlog_samples), default=None),
                       **outage_timeline(arrivals, t_start, t_down, t_up)}
                rows.append(row)
                log(f"outage {who}: received {row['received']}/{res.get('sent')} lost {row['lost']} "
                    f"dups {dups}; cleared {row['cleared_s']} s, last arrival {row['last_s']} s after "
                    f"the restart; peak backlog {row['peak_backlog']} ({row['backlog_metric']}), "
                    f"{row['peak_backlog_sub']} at the subscriber")
                self.results["scenarios"]["outage"] = {
                    "devices": devices, "rate": rate, "duration_s": duration, "down_at_s": down_at,
                    "down_for_s": down_for, "cleared_threshold": OUTAGE_CLEARED, "rows": rows}
                self.save()


    # ---- restart with a big buffer

    def run_restart(self):
        target_mib = 256 if self.quick else 1024
        dead_port = free_port()  # nobody listens: the cloud stays down
        data = self.path("restart-data")
        tcp, api = free_port(), free_port()
        gw, tcp, api, data, conf = self.gateway("restart", dead_port, ack=True, max_size="2GiB",
                                                data=data, ports=(tcp, api))
        devices = 50
        t_fill = time.monotonic()
        sent = 0
        chunk = [
            "tcp", "--target", f"127.0.0.1:{tcp}", "--ack", "--devices", str(devices), "--rate", "0",
            "--payload-size", "1024", "--prefix", "r0", "--messages", "400", "--duration", "300"]
        res = self.sim("restart fill (1 KiB payloads, ack mode, cloud down)", chunk, 400)
        sent += res.get("acked") or 0
        size = metric(api, "fieldgate_buffer_bytes") or 0
        per_msg = size / max(sent, 1)
        remaining = max(0, target_mib * 1024 * 1024 - size)
        per_dev = int(remaining / max(per_msg, 1) / devices) + 1
        log(f"restart fill: {sent} msgs = {size/1048576:.1f} MiB ({per_msg:.0f} B/msg); "
            f"sending {per_dev} more per device")
        chunk2 = list(chunk)
        chunk2[chunk2.index("400")] = str(per_dev)
        chunk2[chunk2.index("r0")] = "r1"
        res2 = self.sim("restart fill (1 KiB payloads, ack mode, cloud down)", chunk2, 900)
        sent += res2.get("acked") or 0
        fill_s = time.monotonic() - t_fill
        size = metric(api, "fieldgate_buffer_bytes")
        events = metric(api, "fieldgate_buffer_events")
        on_disk = du_bytes(data)
        log(f"restart fill done: {sent} acked, buffer {size/1048576:.1f} MiB, {events} events, "
            f"{on_disk/1048576:.1f} MiB on disk, {fill_s:.1f}s")
        out = {"target_mib": target_mib, "acked": sent, "buffer_bytes": size,
               "buffer_events": events, "disk_bytes": on_disk, "fill_s": round(fill_s, 1),
               "fill_rate_msgs": round(sent / fill_s) if fill_s else None,
               "fill_rate_mib_s": round(on_disk / 1048576 / fill_s, 1) if fill_s else None,
               "restarts": []}
        self.results["scenarios"]["restart"] = out
        cmd = [self.gw_bin, "run", "--config", conf]
        for i in range(self.runs):
            stop(gw, signal.SIGKILL)
            time.sleep(0.3)
            t0 = time.monotonic()
            gw = start(cmd, conf + ".log")
            r = probe_restart(gw, tcp, api, t0, 120)
            r["buffer_events_after"] = metric(api, "fieldgate_buffer_events")
            r["rss_kib"] = rss_kib(gw.pid)
            out["restarts"].append(r)
            log(f"restart {i}: connect {r['connect_s']} s, ack {r['ack_s']} s, ready {r['ready_s']} s, "
                f"events {r['buffer_events_after']}")
            self.save()
        stop(gw)
        subprocess.run(["rm", "-rf", data], check=False)

    # ---- reconnect storm

    def run_storm(self):
        duration = 5 if self.quick else 10
        rows = []
        cloud, cloud_port, _ = self.mosquitto("cloud")
        for run in range(self.runs):
            for hello in [False, True]:
                gw, tcp, api, data, _ = self.gateway("storm", cloud_port)
                meter = CpuMeter(gw.pid)
                argv = ["storm", "--target", f"127.0.0.1:{tcp}", "--duration", str(duration),
                        "--concurrency", "32"] + (["--hello"] if hello else [])
                res = self.sim("storm" + (" --hello" if hello else ""), argv, duration + 60)
                cpu = meter.percent()
                lat = res.get("connect_us") or {}
                rows.append({"hello": hello, "run": run, "connects": res.get("connects"),
                             "connects_per_s": res.get("connects_per_s"),
                             "failures": res.get("connect_failures"),
                             "p99_ms": ms(lat.get("p99")), "cpu_pct": cpu,
                             "sim_cpu_pct": res.get("sim_cpu_pct"), "rss_kib": rss_kib(gw.pid),
                             "error": res.get("error"), "errors": res.get("errors")})
                log(f"storm hello={hello}: {res.get('connects_per_s')}/s, "
                    f"failures {res.get('connect_failures')}, gw cpu {cpu}%")
                stop(gw)
                self.results["scenarios"]["storm"] = {"duration_s": duration, "concurrency": 32,
                                                      "rows": rows}
                self.save()
        stop(cloud)


OUTAGE_CLEARED = 1000  # messages outstanding (0.2 s of traffic at 5,000 msg/s)


def missing_summary(arrivals, rate):
    """Gaps in each device's seq numbers, as counts per second of sending (seq / rate),
    to tell an outage-edge loss from a tail loss. Only gaps below a device's highest
    seq that arrived are seen."""
    per_dev = {}
    for dev, seq in arrivals:
        per_dev.setdefault(dev, []).append(seq)
    buckets = {}
    for seqs in per_dev.values():
        have = set(seqs)
        for q in range(min(seqs), max(seqs)):
            if q not in have:
                b = int(q / rate)
                buckets[b] = buckets.get(b, 0) + 1
    return {str(k): buckets[k] for k in sorted(buckets)}


def outage_timeline(arrivals, t_start, t_down, t_up, step=0.05):
    """From {key: (arrival time, send time)}: the backlog seen by the subscriber
    (messages sent but not yet arrived) over time, its peak, and when it was cleared
    after the restart. Messages that never arrived do not count (their send time is
    unknown); they show up as "lost"."""
    import bisect
    sends = sorted(s for _, s in arrivals.values() if s is not None)
    arr = sorted(a for a, _ in arrivals.values())
    out = {"peak_backlog_sub": None, "first_s": None, "cleared_s": None, "last_s": None,
           "tail_s": None, "drain_rate": None, "backlog_1s": []}
    if not arr or not sends:
        return out
    i = bisect.bisect_right(arr, t_up)
    if i < len(arr):
        out["first_s"] = round(arr[i] - t_up, 2)  # first arrival after the restart
    out["last_s"] = round(arr[-1] - t_up, 2)
    out["tail_s"] = round(arr[-1] - sends[-1], 2)  # last arrival after the last send
    peak, cleared = 0, None
    t = t_start
    end = max(arr[-1], sends[-1]) + step
    while t <= end:
        backlog = bisect.bisect_right(sends, t) - bisect.bisect_right(arr, t)
        peak = max(peak, backlog)
        if round((t - t_start) / step) % round(1 / step) == 0:
            out["backlog_1s"].append(backlog)  # one sample a second, from the start
        if cleared is None and t >= t_up and backlog <= OUTAGE_CLEARED:
            cleared = t
        t += step
    out["peak_backlog_sub"] = peak
    if cleared is not None:
        out["cleared_s"] = round(cleared - t_up, 2)
        # Arrivals per second while clearing: the backlog at the restart plus what was
        # sent meanwhile, over the time it took (includes the reconnect delay).
        n = bisect.bisect_right(arr, cleared) - bisect.bisect_right(arr, t_up)
        if cleared > t_up:
            out["drain_rate"] = round(n / (cleared - t_up))
    return out


def probe_restart(gw, tcp, api, t0, timeout):
    """Polls every few ms: TCP connect, a message acked (ack mode), /readyz 200."""
    r = {"connect_s": None, "ack_s": None, "ready_s": None}
    deadline = t0 + timeout
    sock = None
    buf = b""
    while time.monotonic() < deadline and gw.poll() is None:
        now = time.monotonic()
        if r["connect_s"] is None:
            s = socket.socket()
            s.settimeout(0.05)
            try:
                s.connect(("127.0.0.1", tcp))
                r["connect_s"] = round(time.monotonic() - t0, 4)
                sock = s
                sock.sendall(b'{"device":"probe","seq":1,"t":0}\n')
                sock.setblocking(False)
            except OSError:
                s.close()
        elif r["ack_s"] is None and sock is not None:
            try:
                data = sock.recv(4096)
                if data == b"":
                    sock.close()
                    sock, r["connect_s"] = None, None  # closed: start over
                buf += data
                if b'"ack"' in buf:
                    r["ack_s"] = round(time.monotonic() - t0, 4)
            except BlockingIOError:
                pass
            except OSError:
                sock = None
                r["connect_s"] = None
        if r["ready_s"] is None:
            status, _ = http_get(api, "/readyz", 0.2)
            if status == 200:
                r["ready_s"] = round(time.monotonic() - t0, 4)
        if all(v is not None for v in r.values()):
            break
        time.sleep(max(0.0, 0.003 - (time.monotonic() - now)))
    if sock is not None:
        sock.close()
    r["exited"] = gw.poll()
    return r


def du_bytes(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def ms(us):
    return None if us is None else round(us / 1000.0, 2)


def machine_info(root):
    model = "?"
    cores = 0
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("processor"):
                cores += 1

    def cmd(*c):
        try:
            return subprocess.run(c, capture_output=True, text=True, timeout=10, cwd=root).stdout.strip()
        except Exception:
            return "?"

    mem_kib = proc_meminfo("MemTotal")
    return {
        "cpu": model, "cores": cores, "nproc": os.cpu_count(),
        "kernel": platform.release(), "mem_gib": round(mem_kib / 1048576, 1) if mem_kib else None,
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
        "mosquitto": (cmd("mosquitto", "-h").splitlines() or ["?"])[0],
        "rustc": cmd("rustc", "--version"),
        "git": cmd("git", "rev-parse", "--short", "HEAD") + (" (+uncommitted changes)" if cmd("git", "status", "--porcelain") else ""),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "build": os.environ.get("BENCH_BUILD", "?"),
        "binary_mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(
            os.path.getmtime(os.path.join(root, "target/release/fieldgate")))),
    }


def proc_meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


SCENARIOS = ["idle", "load", "ramp", "drain", "restart", "storm", "outage", "link", "graph"]

# The transforms of the "graph" scenario: every event passes both (the filter keeps all
# of the simulator's telemetry), so the cost measured is the work, not fewer events.
GRAPH_TRANSFORMS = """[transforms.hot]
type = "filter"
inputs = ["devices"]
condition = { kind = "telemetry", field = "temp", gt = -1000.0 }

[transforms.normalise]
type = "remap"
inputs = ["hot"]
set = { site = "north" }
convert.temp = { from = "degC", to = "degF" }
"""
# scripts/bench.sh passes this list when no scenarios are named: it means "all of them".
LEGACY_DEFAULT = "idle,load,ramp,drain,restart,storm"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["quick", "full"], default="full")
    ap.add_argument("--only", default=",".join(SCENARIOS))
    ap.add_argument("--work", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--render", default="")
    ap.add_argument("--merge", action="store_true",
                    help="keep scenarios of an existing results file that this run does not redo")
    args = ap.parse_args()
    if args.only == LEGACY_DEFAULT:
        args.only = ",".join(SCENARIOS)
    bench = Bench(args)
    if (args.merge or args.only != ",".join(SCENARIOS)) and os.path.exists(args.out):
        try:
            old = json.load(open(args.out))
            bench.results["scenarios"] = old.get("scenarios", {})
            bench.results["commands"] = old.get("commands", {})
            # Where each kept table came from (files written before this was recorded get
            # the old file's mode, start and commit).
            prov = old.get("scenario_runs", {})
            for name in bench.results["scenarios"]:
                prov.setdefault(name, {"mode": old.get("mode"), "started": old.get("started"),
                                       "git": old.get("machine", {}).get("git")})
            bench.results["scenario_runs"] = prov
            for key in ("scenario_loadavg", "scenario_wall_s"):
                if key in old:
                    bench.results[key] = old[key]
        except ValueError:
            pass
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    for name in only:
        if name not in SCENARIOS:
            sys.exit(f"unknown scenario {name}; known: {','.join(SCENARIOS)}")
    failures = []
    for name in only:
        log(f"=== scenario {name} ({args.mode})")
        bench.results.setdefault("scenario_loadavg", {})[name] = open("/proc/loadavg").read().split()[:3]
        bench.results.setdefault("scenario_runs", {})[name] = {
            "mode": args.mode,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git": bench.results["machine"]["git"]}
        t = time.monotonic()
        try:
            getattr(bench, f"run_{name}")()
        except Exception as e:  # record and go on with the next scenario
            log(f"scenario {name} failed: {e!r}")
            failures.append(f"{name}: {e!r}")
            bench.results.setdefault("failures", []).append(f"{name}: {e!r}")
        finally:
            cleanup()
        bench.results.setdefault("scenario_wall_s", {})[name] = round(time.monotonic() - t)
        bench.save()
    bench.save()
    if failures:
        log("failures: " + "; ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
