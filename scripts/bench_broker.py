"""Quick MQTT broker benchmark with raw sockets (stdlib only), run beside Mosquitto on
the same machine: sequential connects/s, QoS 0 fan-in (4 publishers x 25,000 64 B
messages to one subscriber: delivered count and rate), QoS 1 publish rate (no
subscriber), and the broker's CPU time from /proc.

Usage: python3 scripts/bench_broker.py PORT BROKER_PID LABEL (see docs/BENCHMARKS.md)."""
import os, socket, struct, sys, threading, time

PORT, PID, LABEL = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
TICK = os.sysconf("SC_CLK_TCK")

def cpu():
    with open(f"/proc/{PID}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK

def rss_kib():
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])

def varint(n):
    out = bytearray()
    while True:
        b = n % 128; n //= 128
        out.append(b | (0x80 if n else 0))
        if not n: return bytes(out)

def s16(b): return struct.pack(">H", len(b)) + b

def connect_packet(cid):
    body = s16(b"MQTT") + bytes([4, 2]) + struct.pack(">H", 60) + s16(cid.encode())
    return b"\x10" + varint(len(body)) + body

def publish(topic, payload, qos=0, pid=0):
    body = s16(topic) + (struct.pack(">H", pid) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + varint(len(body)) + body

def open_client(cid):
    s = socket.create_connection(("127.0.0.1", PORT))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(connect_packet(cid))
    assert s.recv(4)[0] == 0x20
    return s

def count_packets(sock, kind, want, result):
    buf = bytearray(); n = 0
    sock.settimeout(3)
    last = time.time()
    while n < want:
        try:
            data = sock.recv(1 << 20)
        except socket.timeout:
            break
        last = time.time()
        if not data: break
        buf += data
        i = 0
        while True:
            if len(buf) - i < 2: break
            mult, length, j = 1, 0, i + 1
            while j < len(buf):
                b = buf[j]; length += (b & 127) * mult; mult *= 128; j += 1
                if not b & 128: break
            else: break
            if len(buf) - j < length: break
            if buf[i] >> 4 == kind: n += 1
            i = j + length
        del buf[:i]
    result.append(n)
    result.append(last)

# connects/s
N = 2000
c0, t0 = cpu(), time.time()
for k in range(N):
    s = open_client(f"c{k}")
    s.sendall(b"\xe0\x00"); s.close()
t = time.time() - t0
print(f"{LABEL}: {N / t:.0f} connects/s (sequential), broker CPU {cpu() - c0:.2f}s")

# QoS 0 fan-in: 4 publishers x 25k messages of 64 B to one subscriber
sub = open_client("sub")
sub.sendall(b"\x82" + varint(2 + 2 + 7 + 1) + struct.pack(">H", 1) + s16(b"bench/#") + b"\x00")
assert sub.recv(5)[0] == 0x90
M, P = 25000, 4
got = []
reader = threading.Thread(target=count_packets, args=(sub, 3, M * P, got)); reader.start()
pubs = [open_client(f"p{k}") for k in range(P)]
payload = b"x" * 64
c0, t0 = cpu(), time.time()
def run(s, k):
    batch = publish(f"bench/{k}".encode(), payload) * 500
    for _ in range(M // 500): s.sendall(batch)
threads = [threading.Thread(target=run, args=(s, k)) for k, s in enumerate(pubs)]
[th.start() for th in threads]; [th.join() for th in threads]
reader.join(120)
t = got[1] - t0
print(f"{LABEL}: QoS 0 fan-in {P}x{M} -> 1: {got[0]} delivered in {t:.2f}s = {got[0] / t:.0f} msg/s, broker CPU {cpu() - c0:.2f}s")

# QoS 1 publish (no subscriber on the topic), window of 64 PUBACKs
s = open_client("q1")
K = 20000
acks = []
r = threading.Thread(target=count_packets, args=(s, 4, K, acks)); r.start()
c0, t0 = cpu(), time.time()
for base in range(0, K, 64):
    s.sendall(b"".join(publish(b"other/q1", payload, 1, (base + i) % 65535 + 1) for i in range(64)))
r.join(120)
t = acks[1] - t0
print(f"{LABEL}: QoS 1 publish {K}: {acks[0]} acked, {acks[0] / t:.0f} msg/s, broker CPU {cpu() - c0:.2f}s, RSS {rss_kib()} KiB")
