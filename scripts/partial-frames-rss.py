#!/usr/bin/env python3
"""RSS of a gateway before, during and after a burst of unfinished frames (issue 9,
finding 11): N connections each send SIZE bytes of a line that never ends, hold them
open, then close. Prints one CSV line: label,before_kib,peak_kib,after_kib,answered_or_closed.

usage: partial-frames-rss.py PID HOST:PORT [N=2000] [SIZE=61440] [LABEL=run]
"""
import socket
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    pid = int(sys.argv[1])
    host, port = sys.argv[2].rsplit(":", 1)
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 60 * 1024
    label = sys.argv[5] if len(sys.argv) > 5 else "run"
    before = rss_kib(pid)
    payload = b"x" * size
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)))
        sock.setblocking(False)
        try:
            sock.send(payload)
        except (BlockingIOError, ConnectionError):
            pass
        sockets.append(sock)
    peak = rss_kib(pid)
    # Let the gateway read what was sent; sample the peak meanwhile.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        peak = max(peak, rss_kib(pid))
        time.sleep(0.1)
    # Connections the gateway answered (an error frame) or closed.
    closed = 0
    for sock in sockets:
        try:
            sock.recv(4096)
            closed += 1
        except BlockingIOError:
            pass
        except (ConnectionError, OSError):
            closed += 1
        sock.close()
    # Give the gateway time to notice the closes and free what it held.
    time.sleep(3)
    after = rss_kib(pid)
    print(f"{label},{before},{peak},{after},{closed}")


if __name__ == "__main__":
    main()
