"""Experiment: what moving a fixed-length body between two sockets costs, copied through user space or
spliced through a pipe (Linux `splice(2)`, `os.splice`), per GB (#17).

    .venv/bin/python -m benchmarks.profile.splice [--mb 1000] [--rounds 3]

A sender process writes `--mb` MB into a loopback TCP connection; this process relays them to a second
loopback connection, read by a receiver process that discards them. The relay is measured alone
(time.process_time of this process, which runs nothing else): `copy` = recv_into a 256 KiB buffer + sendall
(what a proxy's read/write path does, without the event loop), `splice` = socket -> pipe -> socket with
os.splice, the bytes never entering user space. Blocking sockets, so this measures the copy, not the
event loop; the proxy's event-loop cost per read is on top of `copy` and would stay on top of `splice`.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

CHUNK = 256 * 1024
SENDER = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
block = bytes(1 << 20)
for _ in range(int(sys.argv[2])):
    s.sendall(block)
s.close()
"""
RECEIVER = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
buf = bytearray(1 << 20)
while s.recv_into(buf):
    pass
"""


def relay(mode: str, mb: int) -> tuple[float, float]:
    """(relay CPU seconds, wall seconds) to move mb MiB."""
    lin, lout = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    recv = subprocess.Popen([sys.executable, "-c", RECEIVER, str(lout.getsockname()[1])])
    b, _ = lout.accept()
    send = subprocess.Popen([sys.executable, "-c", SENDER, str(lin.getsockname()[1]), str(mb)])
    a, _ = lin.accept()
    left = mb << 20
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "copy":
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while left:
            n = a.recv_into(buf, min(CHUNK, left))
            if not n:
                break
            b.sendall(view[:n])
            left -= n
    else:
        r, w = os.pipe()
        while left:
            n = os.splice(a.fileno(), w, min(1 << 20, left))
            if not n:
                break
            moved = 0
            while moved < n:
                moved += os.splice(r, b.fileno(), n - moved)
            left -= n
        os.close(r)
        os.close(w)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    for s in (a, b, lin, lout):
        s.close()
    send.wait(30)
    recv.wait(30)
    if left:
        raise RuntimeError(f"{mode}: {left} bytes not relayed")
    return cpu, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"machine load at start: {[round(x, 2) for x in os.getloadavg()]}")
    results: dict[str, list[tuple[float, float]]] = {"copy": [], "splice": []}
    for _ in range(args.rounds):
        for mode, rs in results.items():
            rs.append(relay(mode, args.mb))
    gb = (args.mb << 20) / 1e9
    for mode, rs in results.items():
        cpu = statistics.median(c for c, _ in rs) / gb
        mbps = statistics.median((args.mb << 20) / 1e6 / w for _, w in rs)
        print(f"{mode:7s} relay CPU {cpu:.3f} s per GB, {mbps:.0f} MB/s (median of {len(rs)})")
    print(f"machine load at end: {[round(x, 2) for x in os.getloadavg()]}")


if __name__ == "__main__":
    main()
