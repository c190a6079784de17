#!/usr/bin/env python3
"""Device registry benchmark (issue 4): start-up with 100,000 registered devices and
authenticated connects per second.

    python3 scripts/bench/registry.py [--runs 3] [--devices 100000] [--provision 2000]
                                      [--storm-seconds 10] [--concurrency 32] [--no-build]

What it does, all on loopback, ports picked free in 45000-49999, every process it starts
killed by PID on exit:

1. Runs the in-process scale check `registry_scale` (crates/registry/examples) with TMPDIR
   pointed at a private directory and hard-links the `registry.redb` it builds, so the file
   (DEVICES devices, each with a secret) survives the example's tempdir clean-up. Its output
   is quoted as is (memory-only auth lookups). The JWT issuer in that file ("gw-scale")
   does not matter: secrets are checked by hash, the gateway id only names the JWT issuer.
2. Start-up: copies that file to `<data_dir>/registry.redb` of a fresh data dir and starts
   `fieldgate run` (TCP source with auth = "registry", [registry], [api] admin_token, a
   file sink); measures exec -> TCP source accepting and exec -> /readyz 200, and RSS 1 s
   after ready. RUNS times, and the same with an empty registry as the baseline.
3. Connects/s: one gateway on the 100k file with two TCP sources on the same registry and
   sink, `auth = "registry"` and `auth = "none"`. Adds PROVISION devices with
   `POST /api/v1/devices` (16 in flight), writes their secrets and access JWTs to two
   --tokens files, then runs `fieldgate-sim storm --tokens FILE` RUNS times each, interleaved:
   secret (registry source), JWT (registry source), same hellos on the auth = "none" source.

Prints a JSON summary on stdout and writes it to scripts/bench/registry-results.json.
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADMIN_TOKEN = "bench-admin-token-0123456789"
PROCS = []


def log(*parts):
    print("[registry-bench]", *parts, file=sys.stderr, flush=True)


def free_port():
    for port in range(45000 + os.getpid() % 4000, 50000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            if port not in free_port.taken:
                free_port.taken.add(port)
                return port
    raise RuntimeError("no free port in 45000-49999")


free_port.taken = set()


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1048576, 1),
        "kernel": platform.release(),
        "commit": commit + (" (+uncommitted changes)" if dirty else ""),
    }


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def build(skip, bindir):
    if not skip:
        for cmd in (["cargo", "build", "--release", "-p", "fieldgate", "--bin", "fieldgate",
                     "-p", "fieldgate-sim"],
                    ["cargo", "build", "--release", "-p", "fieldgate-registry",
                     "--example", "registry_scale"]):
            log(" ".join(cmd))
            subprocess.run(cmd, cwd=ROOT, check=True)
    os.makedirs(bindir)
    release = os.path.join(ROOT, "target", "release")
    for src in ("fieldgate", "fieldgate-sim", "examples/registry_scale"):
        shutil.copy2(os.path.join(release, src), bindir)
    return {os.path.basename(s): os.path.join(bindir, os.path.basename(s))
            for s in ("fieldgate", "fieldgate-sim", "registry_scale")}


def run_scale_example(exe, devices, work):
    """Runs registry_scale; returns (its output, path of a hard link to the file it built)."""
    tmp = os.path.join(work, "scale-tmp")
    os.makedirs(tmp)
    kept = os.path.join(work, "registry-%d.redb" % devices)
    env = dict(os.environ, TMPDIR=tmp)
    proc = subprocess.Popen([exe, str(devices)], env=env, stdout=subprocess.PIPE, text=True)
    PROCS.append(proc)
    # Link the file as soon as it exists: the link keeps the inode after the tempdir goes.
    while not os.path.exists(kept):
        # tempfile::tempdir() names it ".tmpXXXXXX", which a glob "*" would skip.
        found = [p for d in os.listdir(tmp)
                 if os.path.exists(p := os.path.join(tmp, d, "registry.redb"))]
        if found:
            os.link(found[0], kept)
        elif proc.poll() is not None:
            raise RuntimeError("registry_scale exited before creating its file")
        else:
            time.sleep(0.002)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError("registry_scale failed: %s" % out)
    return out, kept


def write_config(path, data_dir, api_port, sources):
    lines = [
        "[gateway]", 'id = "gw-bench"', 'data_dir = "%s"' % data_dir, "",
        "[log]", 'level = "warn"', "",
        "[api]", 'address = "127.0.0.1:%d"' % api_port, 'admin_token = "%s"' % ADMIN_TOKEN, "",
        "[registry]", 'jwt_ttl = "1h"', "",
    ]
    for name, (port, auth) in sources.items():
        lines += ["[sources.%s]" % name, 'type = "tcp"', 'address = "127.0.0.1:%d"' % port,
                  'auth = "%s"' % auth, "max_connections = 10000", ""]
    lines += ["[sinks.local]", 'type = "file"',
              "inputs = [%s]" % ", ".join('"%s"' % n for n in sources), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def http_get(port, path, timeout=1.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": "Bearer " + ADMIN_TOKEN})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def start_gateway(exe, config, log_path):
    """Starts the gateway; returns (proc, seconds to TCP accept, seconds to /readyz 200)."""
    with open(config) as f:
        text = f.read()
    api_port = int(text.split('[api]\naddress = "127.0.0.1:')[1].split('"')[0])
    tcp_port = int(text.split("[sources.")[1].split('address = "127.0.0.1:')[1].split('"')[0])
    errf = open(log_path, "ab")
    t0 = time.monotonic()
    proc = subprocess.Popen([exe, "run", "--config", config], stdout=errf, stderr=errf)
    PROCS.append(proc)
    tcp_s = ready_s = None
    deadline = t0 + 120
    while (tcp_s is None or ready_s is None) and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("gateway exited with %s; see %s" % (proc.returncode, log_path))
        if tcp_s is None:
            try:
                socket.create_connection(("127.0.0.1", tcp_port), timeout=0.2).close()
                tcp_s = time.monotonic() - t0
            except OSError:
                pass
        if ready_s is None:
            try:
                if http_get(api_port, "/readyz", 0.5)[0] == 200:
                    ready_s = time.monotonic() - t0
            except OSError:
                pass
        time.sleep(0.002)
    if tcp_s is None or ready_s is None:
        raise RuntimeError("gateway not ready within 120 s")
    return proc, tcp_s, ready_s


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def startup_runs(exe, registry_file, work, runs, label):
    results = []
    for i in range(runs):
        data = os.path.join(work, "%s-%d" % (label, i))
        os.makedirs(data)
        if registry_file:
            shutil.copy2(registry_file, os.path.join(data, "registry.redb"))
        config = os.path.join(work, "%s-%d.toml" % (label, i))
        api_port, tcp_port = free_port(), free_port()
        write_config(config, data, api_port, {"devices": (tcp_port, "registry")})
        proc, tcp_s, ready_s = start_gateway(exe, config, os.path.join(work, "gateway.log"))
        time.sleep(1.0)
        rss = rss_kib(proc.pid)
        status, body = http_get(api_port, "/api/v1/devices?limit=1")
        total = json.loads(body)["total"] if status == 200 else None
        stop(proc)
        results.append({"tcp_accepting_s": round(tcp_s, 4), "readyz_s": round(ready_s, 4),
                        "rss_mib": round(rss / 1024, 1), "devices": total, "load": loadavg()})
        log(label, "run", i + 1, results[-1])
    return {
        "runs": results,
        "median_tcp_accepting_s": statistics.median(r["tcp_accepting_s"] for r in results),
        "median_readyz_s": statistics.median(r["readyz_s"] for r in results),
        "median_rss_mib": statistics.median(r["rss_mib"] for r in results),
    }


def provision(api_port, count, concurrency=16):
    local = threading.local()

    def add(n):
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=30)
        body = json.dumps({"id": "bench-%05d" % n, "model": "bench"})
        local.conn.request("POST", "/api/v1/devices", body=body, headers={
            "Authorization": "Bearer " + ADMIN_TOKEN, "Content-Type": "application/json"})
        resp = local.conn.getresponse()
        data = json.loads(resp.read())
        if resp.status != 201:
            raise RuntimeError("POST /api/v1/devices: %s %s" % (resp.status, data))
        return data["device"]["id"], data["secret"], data["tokens"]["access_token"]

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        added = list(pool.map(add, range(1, count + 1)))
    return added, time.monotonic() - started


def storm(sim, port, tokens_file, seconds, concurrency, gateway_pid):
    cmd = [sim, "storm", "--target", "127.0.0.1:%d" % port, "--duration", str(seconds),
           "--concurrency", str(concurrency), "--tokens", tokens_file]
    ticks = cpu_ticks(gateway_pid)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    PROCS.append(proc)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    gateway_cpu = (cpu_ticks(gateway_pid) - ticks) / os.sysconf("SC_CLK_TCK")
    summary = json.loads(out)
    return {
        "connects_per_s": summary["connects_per_s"],
        "connects": summary["connects"],
        "failures": summary["connect_failures"],
        "connect_p99_ms": round(summary["connect_us"]["p99"] / 1000, 2) if summary["connect_us"] else None,
        "gateway_cpu_pct": round(100 * gateway_cpu / summary["duration_s"], 1),
        "sim_cpu_pct": round(100 * (usage.ru_utime + usage.ru_stime) / summary["duration_s"], 1),
        "errors": {k: v["first"] for k, v in summary["errors"].items()},
        "load": loadavg(),
        "command": " ".join(["fieldgate-sim"] + cmd[1:]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--provision", type=int, default=2000)
    parser.add_argument("--storm-seconds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="fg-regbench-")
    result = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "load_start": loadavg(), "args": vars(args)}
    try:
        exes = build(args.no_build, os.path.join(work, "bin"))

        log("registry_scale", args.devices)
        out, registry_file = run_scale_example(exes["registry_scale"], args.devices, work)
        result["scale_example"] = out.strip().splitlines()
        result["registry_file_mib"] = round(os.path.getsize(registry_file) / 1048576, 1)
        log(out)

        result["startup_empty"] = startup_runs(exes["fieldgate"], None, work, args.runs, "empty")
        result["startup_100k"] = startup_runs(exes["fieldgate"], registry_file, work,
                                              args.runs, "full")

        data = os.path.join(work, "storm-data")
        os.makedirs(data)
        shutil.copy2(registry_file, os.path.join(data, "registry.redb"))
        api_port, reg_port, none_port = free_port(), free_port(), free_port()
        config = os.path.join(work, "storm.toml")
        write_config(config, data, api_port,
                     {"registry": (reg_port, "registry"), "open": (none_port, "none")})
        gateway, _, _ = start_gateway(exes["fieldgate"], config, os.path.join(work, "gateway.log"))
        added, took = provision(api_port, args.provision)
        result["provision"] = {"devices": len(added), "seconds": round(took, 2),
                               "per_s": round(len(added) / took, 1), "in_flight": 16}
        log("provisioned", result["provision"])
        secrets = os.path.join(work, "secrets.json")
        jwts = os.path.join(work, "jwts.json")
        with open(secrets, "w") as f:
            json.dump({d: s for d, s, _ in added}, f)
        with open(jwts, "w") as f:
            json.dump({d: j for d, _, j in added}, f)
        runs = {"registry_secret": [], "registry_jwt": [], "none": []}
        for i in range(args.runs):
            for mode, port, tokens in (("registry_secret", reg_port, secrets),
                                       ("registry_jwt", reg_port, jwts),
                                       ("none", none_port, secrets)):
                r = storm(exes["fieldgate-sim"], port, tokens, args.storm_seconds,
                          args.concurrency, gateway.pid)
                runs[mode].append(r)
                log("storm", mode, i + 1, {k: r[k] for k in ("connects_per_s", "failures",
                                                             "gateway_cpu_pct", "load")})
        result["rss_after_storms_mib"] = round(rss_kib(gateway.pid) / 1024, 1)
        # Negative control, last (failures throttle 127.0.0.1): wrong secrets get no welcome.
        wrong = os.path.join(work, "wrong.json")
        with open(wrong, "w") as f:
            json.dump({d: s[::-1] for d, s, _ in added}, f)
        control = storm(exes["fieldgate-sim"], reg_port, wrong, 1, 4, gateway.pid)
        result["wrong_secret_control"] = {k: control[k] for k in ("connects", "failures", "errors")}
        log("wrong-secret control", result["wrong_secret_control"])
        stop(gateway)
        result["storm"] = {mode: {"runs": rs,
                                  "median_connects_per_s": statistics.median(
                                      r["connects_per_s"] for r in rs),
                                  "failures": sum(r["failures"] for r in rs)}
                           for mode, rs in runs.items()}
        result["config"] = open(config).read().replace(work, "WORK")
    finally:
        for proc in PROCS:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["load_end"] = loadavg()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    text = json.dumps(result, indent=2)
    with open(os.path.join(ROOT, "scripts", "bench", "registry-results.json"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
