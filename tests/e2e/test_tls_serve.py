"""`turnout serve --config FILE` and `--tls-cert/--tls-key` as real processes, with real clients (curl with
--cacert/--resolve, httpx): a TLS listener beside a cleartext one, --workers 2 on a TLS listener, an
unreadable key at start, and `turnout check --config` with field paths."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.tlscerts import ADMIN, API, CA, serial_of, serial_of_der

from .helpers import ROOT, Turnout, backend, free_port, wait_until

pytestmark = pytest.mark.slow


def routes_file(tmp: Path, port: int) -> str:
    f = tmp / "routes.yaml"
    f.write_text(f"versions:\n  v1: {{endpoints: ['http://127.0.0.1:{port}']}}\n"
                 "routes:\n  - name: web\n    split: {v1: 100}\n")
    return str(f)


def without_listen(t: Turnout) -> Turnout:
    i = t.args.index("--listen")
    del t.args[i:i + 2]
    return t


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "5", *args], capture_output=True, text=True, timeout=10,
                          check=False)


def test_a_tls_listener_and_a_cleartext_one_from_the_config_file(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    ca.issue("api", API)
    ca.issue("admin", ADMIN)
    tls_port, plain_port = free_port(), free_port()
    config = tmp_path / "turnout.yaml"
    config.write_text(f"""
listeners:
  - name: public
    address: 127.0.0.1:{tls_port}
    tls:
      certificates:
        - {{cert: api.pem, key: api-key.pem}}
        - {{cert: admin.pem, key: admin-key.pem}}
  - name: plain
    address: 127.0.0.1:{plain_port}
timeouts: {{shutdown_grace: 1}}
""")
    with backend("v1") as port, without_listen(Turnout(tmp_path, routes_file(tmp_path, port), "--config",
                                                       str(config))) as t:
        for name in (API, ADMIN):
            r = curl("--cacert", str(ca.path), "--resolve", f"{name}:{tls_port}:127.0.0.1",
                     "-w", "%{http_code}", "-o", "/dev/null", f"https://{name}:{tls_port}/")
            assert (r.returncode, r.stdout) == (0, "200")
        r = curl("--cacert", str(ca.path), "--resolve", f"{API}:{tls_port}:127.0.0.1", "-H", f"Host: {ADMIN}",
                 "-w", "%{http_code}", "-o", "/dev/null", f"https://{API}:{tls_port}/")
        assert r.stdout == "421"
        ctx = ssl.create_default_context(cafile=str(ca.path))
        with httpx.Client(verify=ctx) as client:
            resp = client.get(f"https://127.0.0.1:{tls_port}/", headers={"Host": API},
                              extensions={"sni_hostname": API})
        assert resp.status_code == 200
        r = curl("-w", "%{http_code}", "-o", "/dev/null", f"http://127.0.0.1:{plain_port}/")
        assert r.stdout == "200"
        assert t.stop() == 0


def test_workers_2_serve_a_tls_listener_made_by_tls_cert_and_tls_key(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    pair = ca.issue("api", API)
    with backend("v1") as port, Turnout(tmp_path, routes_file(tmp_path, port), "--workers", "2", "--tls-cert",
                                        str(pair.cert), "--tls-key", str(pair.key), "--shutdown-grace", "1") as t:
        for _ in range(6):  # new connections: the kernel spreads them over both workers
            r = curl("--cacert", str(ca.path), "--resolve", f"{API}:{t.port}:127.0.0.1", "-w", "%{http_code}",
                     "-o", "/dev/null", f"https://{API}:{t.port}/")
            assert (r.returncode, r.stdout) == (0, "200")
        r = curl("-w", "%{http_code}", "-o", "/dev/null", f"http://127.0.0.1:{t.port}/")
        assert r.stdout == "000"  # cleartext to a TLS listener gets no HTTP answer
        assert t.stop() == 0


def test_an_unreadable_key_is_one_line_naming_its_field_and_exit_1(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    ca.issue("api", API)
    config = tmp_path / "turnout.yaml"
    config.write_text(f"listeners:\n  - address: 127.0.0.1:{free_port()}\n    tls:\n"
                      "      certificates: [{cert: api.pem, key: missing-key.pem}]\n")
    proc = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--state-dir",
                           str(tmp_path / "state"), "--admin", f"127.0.0.1:{free_port()}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
                          env={**os.environ, "TURNOUT_ADMIN_TOKEN": "t"})
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["turnout: listeners[0].tls.certificates[0].key: file not found"]


def test_check_config_reports_every_error_with_its_field_path(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    ca.issue("api", API)
    config = tmp_path / "turnout.yaml"
    config.write_text("listeners:\n  - address: 127.0.0.1:8443\n    tls:\n"
                      "      certificates: [{cert: api.pem, key: api-key.pem}, {cert: nope.pem, key: api-key.pem}]\n"
                      "  - address: 127.0.0.1:8080\n    tls: {certificates: [{cert: api.pem, key: api.pem}]}\n")
    proc = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0] == f"{config}: listeners[0].tls.certificates[1].cert: file not found"
    assert lines[1].startswith(f"{config}: listeners[1].tls.certificates[0].key: not the private key of ")
    assert lines[2:] == [f"{config}: 2 error(s)"]
    config.write_text("listeners:\n  - address: 127.0.0.1:8443\n    tls:\n"
                      "      certificates: [{cert: api.pem, key: api-key.pem}]\nworkers: 2\n")
    proc = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, check=False)
    assert (proc.returncode, proc.stdout) == (0, f"{config}: OK (1 listener(s), 1 with TLS)\n")


def test_sighup_to_a_single_process_tls_proxy_reloads_its_certificate(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    pair = ca.issue("api", API)
    with backend("v1") as port, Turnout(tmp_path, routes_file(tmp_path, port), "--tls-cert", str(pair.cert),
                                        "--tls-key", str(pair.key), "--shutdown-grace", "1") as t:
        assert t.proc is not None
        fresh = ca.issue("api-new", API)
        os.replace(fresh.key, pair.key)
        os.replace(fresh.cert, pair.cert)
        t.proc.send_signal(signal.SIGHUP)
        want = serial_of(pair.cert.read_bytes())
        got = wait_until(lambda: served_serial(t.port, ca) == want, timeout=5)
        assert got is True
        assert t.proc.poll() is None
        assert t.stop() == 0


def served_serial(port: int, ca: CA) -> int:
    ctx = ssl.create_default_context(cafile=str(ca.path))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=API) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return serial_of_der(der)
