"""RSS per idle MQTT 3.1.1 connection (CONNECT done, then silent), from /proc.

Usage: python3 scripts/bench_broker_idle.py PORT BROKER_PID LABEL COUNT."""
import socket, struct, sys, time
PORT, PID, LABEL, N = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def rss():
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            if line.startswith("VmRSS"): return int(line.split()[1])
def s16(b): return struct.pack(">H", len(b)) + b
def connect_packet(cid):
    body = s16(b"MQTT") + bytes([4, 2]) + struct.pack(">H", 600) + s16(cid.encode())
    return b"\x10" + bytes([len(body)]) + body
base = rss()
socks = []
for k in range(N):
    s = socket.create_connection(("127.0.0.1", PORT))
    s.sendall(connect_packet(f"idle{k}"))
    assert s.recv(4)[0] == 0x20
    socks.append(s)
time.sleep(1)
after = rss()
print(f"{LABEL}: {N} idle clients: RSS {base} -> {after} KiB, {(after - base) * 1024 / N:.0f} B per client")
