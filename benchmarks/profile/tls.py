"""TLS termination, turnout vs HAProxy: CPU per keep-alive request, and full handshakes per second (#13).

    .venv/bin/python -m benchmarks.profile.tls [--rounds 5] [--seconds 5] [--out benchmarks/results] [--quick]

Same method as the benchmark harness (docs/performance.md, "The benchmark harness"): nginx backends (14-byte
answers) and wrk on core 0, each proxy under `taskset -c 1`, turnout with the benchmark route (sticky 90/10,
10,000 pins), HAProxy with the shared anchor `benchmarks/configs/haproxy-tls.cfg.tmpl` (`alpn http/1.1`).
Both serve one self-signed ECDSA P-256 certificate generated for the run. Runs are interleaved (the order
flips every round); medians are reported. Two measures:

- keep-alive: `wrk -t1 -c32` on https://, CPU per request = utime+stime of the proxy's process group from
  /proc before and after, divided by the requests wrk completed;
- handshakes: `hey -disable-keepalive -c32`: every request a new connection and a full handshake. Not wrk
  with `Connection: close`: wrk keeps the session across its reconnects (SSL_clear) and resumes it, which
  HAProxy's `ssl_fc_is_resumed` shows for nearly every connection; hey (Go's TLS client, no session cache)
  and `openssl s_time -new` resume none, and hey costs the client half the CPU per handshake of s_time.
  hey sends one client id (`c42`, unpinned: the sticky hash). handshakes/s = requests/s, CPU per
  handshake as above. The client shares core 0 with the backends: `proxy_core_busy` (the proxy's CPU
  seconds per wall second) says whether the proxy or the client was the limit.

`--quick` (1 round of 1 s each) checks that the script works; it measures nothing worth keeping. Nothing
here runs in the test suite. Writes `tls-<date>.json`, `.md` and `.png` under `--out` (never `latest.*`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import benchmarks.peers as peers
from benchmarks.load import WrkResult, run_tool, run_wrk
from benchmarks.peers import Backends, Lab, Target
from benchmarks.procs import (
    Proc,
    Processes,
    StartError,
    cores,
    free_port,
    machine_load,
    pinned,
    raise_nofile,
    require_tools,
    wait_port,
)

RESULTS = Path(__file__).resolve().parent.parent / "results"
TARGET_CPU_RATIO = 1.3  # turnout's CPU per keep-alive request <= 1.3x HAProxy's
TARGET_HANDSHAKE_RATIO = 0.8  # turnout's full handshakes per second >= 0.8x HAProxy's
MEASURES = ("keepalive", "handshake")


def write_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1/localhost: (cert, key, cert+key for HAProxy)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.DNSName("bench")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    paths = folder / "cert.pem", folder / "key.pem", folder / "both.pem"
    paths[0].write_bytes(cert_pem)
    paths[1].write_bytes(key_pem)
    paths[2].write_bytes(cert_pem + key_pem)
    for p in paths:
        os.chmod(p, 0o600)
    return paths


def https_get(port: int) -> int:
    """One request over a fresh TLS connection, certificate unchecked (readiness only); the status."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nX-Client-Id: ready\r\nConnection: close\r\n\r\n")
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


def wait_https(proc: Proc, port: int, timeout: float) -> None:
    wait_port(proc, port, timeout)
    deadline, last = time.monotonic() + 15.0, ""
    while time.monotonic() < deadline:
        if not proc.alive:
            raise StartError(f"{proc.name} exited with status {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            status = https_get(port)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise StartError(f"{proc.name} did not answer 200 over TLS on port {port} ({last}):\n{proc.log_tail()}")


def start_haproxy_tls(lab: Lab, b: Backends, pem: Path) -> Target:
    run = lab.work / "haproxy-tls"
    run.mkdir()
    port = free_port()
    text = peers.render("haproxy-tls.cfg.tmpl", LISTEN=f"127.0.0.1:{port}", V1=f"127.0.0.1:{b.v1}",
                        V2=f"127.0.0.1:{b.v2}", RUN=str(run), PEM=str(pem), ALPN="http/1.1")
    conf = run / "haproxy.cfg"
    conf.write_text(text)
    proc = lab.procs.start("haproxy", pinned(["haproxy", "-f", str(conf)], lab.proxy_core), run / "stdout.log")
    wait_https(proc, port, 10.0)
    return Target("haproxy", port, proc)


def start_turnout_tls(lab: Lab, b: Backends, cert: Path, key: Path) -> Target:
    run = lab.work / "turnout-tls"
    run.mkdir()
    port, admin = free_port(), free_port()
    routes = lab.write_routes(b, 10_000, run)
    argv = [sys.executable, "-m", "proxy", "serve", "--routes", str(routes), "--store", f"sqlite:///{run / 'state.db'}",
            "--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert), "--tls-key", str(key),
            "--admin", f"127.0.0.1:{admin}", "--workers", "1", "--shutdown-grace", "1", "--state-dir", str(run)]
    env = dict(os.environ, TURNOUT_STATE_DIR=str(run), TURNOUT_ADMIN_TOKEN="bench-tls", PYTHONPATH=str(peers.REPO))
    proc = lab.procs.start("turnout", pinned(argv, lab.proxy_core), run / "stdout.log", env=env, cwd=peers.REPO)
    wait_https(proc, port, 90.0)
    return Target("turnout", port, proc)


def compiled() -> bool:
    """Whether the data plane runs compiled (mypyc .so next to the module), as benchmarks must."""
    return any((peers.REPO / "proxy" / "dataplane").glob("dispatch.*.so"))


def machine() -> dict[str, Any]:
    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if text else "?"

    return {"cores": os.cpu_count(), "python": sys.version.split()[0], "openssl_python": ssl.OPENSSL_VERSION,
            "haproxy": version(["haproxy", "-v"]), "wrk": version(["wrk", "-v"]), "compiled_dataplane": compiled()}


async def run_hey(port: int, seconds: float, core: int | None, connections: int = 32) -> WrkResult:
    """hey with a new connection (and full TLS handshake) per request; its summary as a WrkResult."""
    argv = pinned(["hey", "-z", f"{max(1, round(seconds))}s", "-c", str(connections), "-disable-keepalive",
                   "-host", "bench", "-H", "X-Client-Id: c42", f"https://127.0.0.1:{port}/"], core)
    returncode, text = await run_tool(argv, seconds + 30)
    total = re.search(r"Total:\s+([\d.]+) secs", text)
    statuses = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)}
    _, _, error_part = text.partition("Error distribution:")
    errors = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]", error_part, re.M))
    p50 = re.search(r"50%+ in ([\d.]+) secs", text)
    p99 = re.search(r"99%+ in ([\d.]+) secs", text)
    if returncode != 0 or total is None:
        raise RuntimeError(f"hey exited {returncode}: {text[-500:]}")
    ok = statuses.get(200, 0)
    return WrkResult(requests=sum(statuses.values()), seconds=float(total.group(1)), socket_errors=errors,
                     non_2xx=sum(statuses.values()) - ok, p50_ms=float(p50.group(1)) * 1000 if p50 else 0.0,
                     p99_ms=float(p99.group(1)) * 1000 if p99 else 0.0)


async def measure(t: Target, seconds: float, work: Path, load_core: int | None, close: bool) -> dict[str, float]:
    assert t.proc is not None
    before, wall = t.proc.cpu(), time.monotonic()
    w = await (run_hey(t.port, seconds, load_core) if close else
               run_wrk(t.port, seconds, work, load_core, scheme="https"))
    after, wall = t.proc.cpu(), time.monotonic() - wall
    n = max(w.requests, 1)
    cpu = (after.user - before.user) + (after.system - before.system)
    return {"rps": w.rps, "requests": w.requests, "user_us": (after.user - before.user) / n * 1e6,
            "sys_us": (after.system - before.system) / n * 1e6, "cpu_us": cpu / n * 1e6,
            "proxy_core_busy": cpu / wall, "non_2xx": w.non_2xx, "socket_errors": w.socket_errors,
            "p50_ms": w.p50_ms, "p99_ms": w.p99_ms}


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def summarize(runs: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, Any]:
    med = {m: {name: medians(rs[m]) for name, rs in runs.items()} for m in MEASURES}
    cpu_ratio = med["keepalive"]["turnout"]["cpu_us"] / med["keepalive"]["haproxy"]["cpu_us"]
    hs_ratio = med["handshake"]["turnout"]["rps"] / med["handshake"]["haproxy"]["rps"]
    hs_cpu_ratio = med["handshake"]["turnout"]["cpu_us"] / med["handshake"]["haproxy"]["cpu_us"]
    # Per round, turnout over HAProxy measured back to back: less exposed to the machine's load moving
    # between rounds than the ratio of the two medians.
    paired = {f"{m}_{k}": round(statistics.median(t[k] / h[k] for t, h in zip(runs["turnout"][m], runs["haproxy"][m],
                                                                             strict=True)), 3)
              for m in MEASURES for k in ("rps", "cpu_us")}
    return {"medians": med, "paired_ratio_medians": paired, "ratios": {
        "keepalive_cpu_us": round(cpu_ratio, 3), "keepalive_rps": round(
            med["keepalive"]["turnout"]["rps"] / med["keepalive"]["haproxy"]["rps"], 3),
        "handshakes_per_s": round(hs_ratio, 3), "handshake_cpu_us": round(hs_cpu_ratio, 3),
        # What one saturated core would do (1 / CPU per handshake), for when the client was the limit.
        "handshake_capacity": round(1 / hs_cpu_ratio, 3)},
        "targets": {"keepalive_cpu_ratio_max": TARGET_CPU_RATIO, "keepalive_cpu_met": cpu_ratio <= TARGET_CPU_RATIO,
                    "handshake_ratio_min": TARGET_HANDSHAKE_RATIO,
                    "handshake_met": hs_ratio >= TARGET_HANDSHAKE_RATIO}}


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    med, r, tg, p = s["medians"], s["ratios"], s["targets"], s["paired_ratio_medians"]
    ka, hs = med["keepalive"], med["handshake"]
    lines = [
        f"# TLS termination, turnout vs HAProxy ({doc['date']}{', quick' if doc['quick'] else ''})", "",
        f"Command: `{doc['command']}`. {doc['plan']['rounds']} interleaved rounds of {doc['plan']['seconds']:g} s "
        f"per proxy and measure, medians. ECDSA P-256 certificate, TLS 1.2+ (TLS 1.3 negotiated), "
        "HAProxy `alpn http/1.1`; proxy on core 1, the client (wrk, hey) and the nginx backends on core 0; "
        "turnout with the benchmark route (sticky 90/10, 10,000 pins).", "",
        f"Machine load (1/5/15 min) at start {doc['load_start']}, at end {doc['load_end']}; the machine is shared "
        "with other work, so absolute numbers move; the ratios (same run, interleaved) move less.", "",
        "| keep-alive HTTPS (wrk -t1 -c32) | req/s | CPU µs/req (user+sys) | proxy core busy |",
        "|---|---:|---:|---:|"]
    for name in ("turnout", "haproxy"):
        m = ka[name]
        lines.append(f"| {name} | {m['rps']:.0f} | {m['cpu_us']:.1f} ({m['user_us']:.1f}+{m['sys_us']:.1f}) | "
                     f"{m['proxy_core_busy']:.2f} |")
    lines += [f"| turnout/HAProxy | {r['keepalive_rps']:.2f}x | {r['keepalive_cpu_us']:.2f}x "
              f"(target <= {tg['keepalive_cpu_ratio_max']}x: {'met' if tg['keepalive_cpu_met'] else 'NOT met'}) | |",
              "", "| full handshakes (hey -c32 -disable-keepalive) | handshakes/s | CPU µs/handshake | "
              "proxy core busy |", "|---|---:|---:|---:|"]
    for name in ("turnout", "haproxy"):
        m = hs[name]
        lines.append(f"| {name} | {m['rps']:.0f} | {m['cpu_us']:.1f} ({m['user_us']:.1f}+{m['sys_us']:.1f}) | "
                     f"{m['proxy_core_busy']:.2f} |")
    lines += [f"| turnout/HAProxy | {r['handshakes_per_s']:.2f}x (target >= {tg['handshake_ratio_min']}x: "
              f"{'met' if tg['handshake_met'] else 'NOT met'}) | {r['handshake_cpu_us']:.2f}x | |", "",
              "Median of the per-round ratios turnout/HAProxy (each round's two runs back to back): keep-alive "
              f"CPU/req {p['keepalive_cpu_us']:.2f}x, req/s {p['keepalive_rps']:.2f}x; handshakes/s "
              f"{p['handshake_rps']:.2f}x, CPU/handshake {p['handshake_cpu_us']:.2f}x.", "",
              "Proxy core busy: the proxy's CPU seconds per wall second (1.0 = its core was saturated; below that, "
              "the client on core 0 was the limit). When neither proxy saturated its core, the handshakes/s ratio "
              "measures the client more than the proxies; the capacity a saturated core would give "
              f"(1 / CPU per handshake) is turnout/HAProxy {r['handshake_capacity']:.2f}x.", "", "Every run:", "",
              "| round | measure | proxy | req/s | CPU µs/req | busy | non-2xx | socket errors |",
              "|---:|---|---|---:|---:|---:|---:|---:|"]
    for run in doc["runs"]:
        lines.append(f"| {run['round']} | {run['measure']} | {run['proxy']} | {run['rps']:.0f} | {run['cpu_us']:.1f} | "
                     f"{run['proxy_core_busy']:.2f} | {run['non_2xx']} | {run['socket_errors']} |")
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = doc["summary"]["medians"]
    names = ("turnout", "haproxy")
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    panels = (("keepalive", "cpu_us", "keep-alive: CPU µs per request"),
              ("handshake", "rps", "full handshakes per second"), ("handshake", "cpu_us", "CPU µs per handshake"))
    for ax, (m, key, title) in zip(axes, panels, strict=True):
        values = [med[m][n][key] for n in names]
        ax.bar(names, values, color=("#2a7ab0", "#999999"))
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.0f}" if v >= 100 else f"{v:.1f}", ha="center", va="bottom")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"TLS termination (ECDSA P-256), medians, {doc['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_again(path: Path) -> None:
    doc = json.loads(path.read_text())
    by_proxy: dict[str, dict[str, list[dict[str, float]]]] = {"turnout": {m: [] for m in MEASURES},
                                                              "haproxy": {m: [] for m in MEASURES}}
    for run in doc["runs"]:
        by_proxy[run["proxy"]][run["measure"]].append({k: v for k, v in run.items()
                                                        if k not in ("round", "measure", "proxy")})
    doc["summary"] = summarize(by_proxy)
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    path.with_suffix(".md").write_text(markdown(doc))
    chart(doc, path.with_suffix(".png"))
    print(markdown(doc))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s: checks the script, measures nothing")
    ap.add_argument("--render", type=Path, default=None, help="recompute the summary, Markdown and PNG of a JSON")
    args = ap.parse_args()
    if args.render is not None:
        render_again(args.render)
        return
    if args.quick:
        args.rounds, args.seconds = 1, 1.0
    require_tools("wrk", "hey", "haproxy", "nginx", "taskset")
    if not compiled():
        print("warning: the data plane is not compiled (pure Python build); the numbers do not describe a release",
              flush=True)
    raise_nofile()
    proxy_core, load_core = cores()
    load_start = machine_load("start")
    started = time.monotonic()
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="turnout-tls-"))
    runs: list[dict[str, Any]] = []
    by_proxy: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        lab = Lab(work, procs, proxy_core, load_core)
        cert, key, both = write_certificate(work)
        b = lab.start_backends()
        targets = [start_turnout_tls(lab, b, cert, key), start_haproxy_tls(lab, b, both)]
        by_proxy = {t.name: {m: [] for m in MEASURES} for t in targets}
        for t in targets:  # warm-up
            await run_wrk(t.port, 1, work, load_core, scheme="https")
        for r in range(args.rounds):
            order = targets if r % 2 == 0 else targets[::-1]
            for measure_name in MEASURES:
                for t in order:
                    m = await measure(t, args.seconds, work, load_core, close=measure_name == "handshake")
                    by_proxy[t.name][measure_name].append(m)
                    runs.append({"round": r, "measure": measure_name, "proxy": t.name, **m})
                    print(f"round {r} {measure_name:9s} {t.name:8s} {m['rps']:8.0f} req/s  cpu {m['cpu_us']:6.1f} us "
                          f"(user {m['user_us']:5.1f} sys {m['sys_us']:5.1f})  busy {m['proxy_core_busy']:.2f}  "
                          f"non2xx {m['non_2xx']:.0f} errors {m['socket_errors']:.0f}", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    load_end = machine_load("end")
    now = dt.datetime.now(dt.UTC)
    doc = {"schema": "turnout-tls-benchmark/1", "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
           "command": " ".join(["python -m benchmarks.profile.tls", *sys.argv[1:]]),
           "machine": {**machine(), "proxy_core": proxy_core, "load_core": load_core},
           "plan": {"rounds": args.rounds, "seconds": args.seconds, "connections": 32, "pins": 10_000,
                    "certificate": "ECDSA P-256, self-signed", "haproxy_alpn": "http/1.1"},
           "load_start": load_start, "load_end": load_end, "summary": summarize(by_proxy), "runs": runs,
           "total_seconds": round(time.monotonic() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"tls-{now.strftime('%Y%m%dT%H%M%SZ')}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))
    chart(doc, stem.with_suffix(".png"))
    print(markdown(doc))
    print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    asyncio.run(main())
