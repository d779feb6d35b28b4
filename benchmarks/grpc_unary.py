"""`python -m benchmarks.grpc_unary [--calls N] [--concurrency C] [--rounds R] [--out DIR]`: gRPC unary calls per
second through turnout (h2c listener -> h2c version) against the same grpcio server called directly.

Bounded: N calls per target and round (default 3,000), each round cut at --max-seconds; R rounds (default 3),
direct and turnout interleaved so drift on this shared machine hits both alike; the median round is
reported. Every answer is checked (its payload names the call): a wrong or failed call fails the run
(exit 1) instead of counting. The server runs in a process of its own, the client in this one; turnout's
CPU time per call is read from /proc. Results: benchmarks/results/grpc-<UTC timestamp>/ (JSON + Markdown).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc

METHOD = "/bench.Echo/Unary"
RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(port: int) -> None:
    """The upstream: a grpcio server echoing the request with a prefix."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"ok:" + req)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {"Unary": handler}),))
    # The standard health service: turnout checks the version with grpc.health.v1.Health/Check.
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_calls(target: str, calls: int, concurrency: int, max_seconds: float) -> dict[str, Any]:
    """`calls` unary calls on ONE channel, at most `concurrency` in flight; raises on any wrong answer."""
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        call(b"warm", timeout=10)
        slots = threading.Semaphore(concurrency)
        lock = threading.Lock()
        wrong: list[str] = []
        count = [0]
        all_done = threading.Event()

        def finished(f: Any, payload: bytes) -> None:
            try:
                ok = f.result() == b"ok:" + payload
            except grpc.RpcError as e:
                ok = False
                wrong.append(f"{payload!r}: {e.code()}")
            with lock:
                if not ok and not wrong:
                    wrong.append(f"wrong answer for call {payload!r}")
                count[0] += 1
                if count[0] == sent[0]:
                    all_done.set()
            slots.release()

        sent = [0]
        t0 = time.monotonic()
        for i in range(calls):
            if time.monotonic() - t0 > max_seconds or wrong:
                break
            slots.acquire()
            payload = str(i).encode()
            with lock:
                sent[0] += 1
            call.future(payload, timeout=10).add_done_callback(lambda f, p=payload: finished(f, p))
        if not all_done.wait(60):
            raise RuntimeError("calls did not finish")
        took = time.monotonic() - t0
        if wrong:
            raise RuntimeError(wrong[0])
        done = count[0]
    return {"calls": done, "seconds": round(took, 4), "calls_per_second": round(done / took, 1)}


def start_turnout(work: Path, upstream: int, listen: int, admin: int) -> subprocess.Popen[bytes]:
    (work / "config.yaml").write_text(
        f"listeners:\n  - {{name: plain, address: 127.0.0.1:{listen}, protocols: [http/1.1, h2c]}}\n"
        f"admin: 127.0.0.1:{admin}\n")
    (work / "routes.yaml").write_text(
        "versions:\n"
        f"  v1: {{endpoints: ['http://127.0.0.1:{upstream}'], protocol: h2c, health: {{grpc: true, interval: 5}}}}\n"
        "routes:\n  - {name: grpc, split: {v1: 100}}\n")
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(work / "config.yaml"), "--routes",
         str(work / "routes.yaml"), "--state-dir", str(work / "state"), "--store", f"sqlite:///{work / 'db.sqlite'}"],
        stdout=subprocess.DEVNULL, stderr=open(work / "turnout.log", "wb"))  # lives with the process


def wait_ready(target: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(target) as ch:
            ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None)(b"x", timeout=1)
            return
        time.sleep(0.2)
    raise RuntimeError(f"{target} did not answer in time")


def markdown(doc: dict[str, Any]) -> str:
    d, t = doc["median"]["direct"], doc["median"]["turnout"]
    lines = [
        f"# gRPC unary through turnout ({doc['time']})", "",
        f"{doc['calls']} calls per target and round on one channel, {doc['concurrency']} in flight, "
        f"{doc['rounds']} interleaved rounds (median shown); build: {doc['build']}; {doc['machine']}.", "",
        "| target | calls/s | turnout CPU per call |", "|---|---:|---:|",
        f"| direct (grpcio server) | {d['calls_per_second']:.0f} | - |",
        f"| through turnout (h2c -> h2c) | {t['calls_per_second']:.0f} | {t['cpu_us_per_call']:.0f} us |", "",
        f"Ratio turnout / direct: {doc['ratio']:.2f}. The client and the grpcio server share the machine's "
        "two cores with turnout, so the direct figure is bounded by them too.", "",
        "Rounds (calls/s, direct / turnout): " + ", ".join(
            f"{r['direct']['calls_per_second']:.0f} / {r['turnout']['calls_per_second']:.0f}" for r in doc["runs"]),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return 0
    up_port, listen, admin = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="turnout-grpc-bench-") as tmp:
        try:
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.grpc_unary", "--serve", str(up_port)]))
            tp = start_turnout(Path(tmp), up_port, listen, admin)
            procs.append(tp)
            wait_ready(f"127.0.0.1:{up_port}", time.monotonic() + 20)
            try:
                wait_ready(f"127.0.0.1:{listen}", time.monotonic() + 30)
            except RuntimeError:
                print((Path(tmp) / "turnout.log").read_text(), file=sys.stderr)
                raise
            runs = []
            for _ in range(args.rounds):
                direct = run_calls(f"127.0.0.1:{up_port}", args.calls, args.concurrency, args.max_seconds)
                c0 = cpu_seconds(tp.pid)
                through = run_calls(f"127.0.0.1:{listen}", args.calls, args.concurrency, args.max_seconds)
                through["cpu_us_per_call"] = round((cpu_seconds(tp.pid) - c0) / through["calls"] * 1e6, 1)
                runs.append({"direct": direct, "turnout": through})
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
    def med(side: str, key: str) -> float:
        return float(statistics.median(r[side][key] for r in runs))

    compiled = any(Path(__file__).parent.parent.joinpath("proxy").rglob("*.so"))
    doc = {
        "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "calls": args.calls,
        "concurrency": args.concurrency, "rounds": args.rounds,
        "build": "compiled (mypyc)" if compiled else "pure Python", "machine": f"{os.cpu_count()} CPUs",
        "runs": runs,
        "median": {"direct": {"calls_per_second": med("direct", "calls_per_second")},
                   "turnout": {"calls_per_second": med("turnout", "calls_per_second"),
                               "cpu_us_per_call": med("turnout", "cpu_us_per_call")}},
    }
    doc["ratio"] = round(doc["median"]["turnout"]["calls_per_second"] / doc["median"]["direct"]["calls_per_second"], 3)
    out = args.out or RESULTS / f"grpc-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpc.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "grpc.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
