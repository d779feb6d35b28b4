"""`turnout check` of HTTPRoute streams: warnings on stderr, `--explain` prints the turnout routes a file
becomes (each headed by the document field it came from), `--json` the same as data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli import main

ROOT = Path(__file__).resolve().parents[2]
STREAM = """\
apiVersion: turnout/v1
kind: Version
metadata: {name: v1}
spec: {endpoints: ["http://127.0.0.1:9001"]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: shop
  annotations: {turnout/fallback: v1, team: checkout}
spec:
  parentRefs: [{name: gw}]
  hostnames: [shop.example.com]
  rules:
  - matches: [{path: {type: Exact, value: /cart}, method: GET}]
    backendRefs: [{name: v1, port: 8080}]
"""


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["check", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_prints_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "shop.yaml"
    f.write_text(STREAM)
    assert run(capsys, str(f)) == (0, f"{f}: OK (1 versions, 1 routes, 0 pins)\n", (
        f"{f}: warning: HTTPRoute shop: spec.parentRefs: ignored: turnout's listeners serve every route (no Gateway "
        "to attach to)\n"
        f"{f}: warning: HTTPRoute shop: spec.rules[0].backendRefs[0].port: ignored: a version's endpoints carry their "
        "ports\n"))


def test_explain_prints_the_native_routes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "shop.yaml"
    f.write_text(STREAM)
    code, out, _ = run(capsys, "--explain", str(f))
    assert (code, out) == (0, """\
versions:
  v1:
    endpoints:
    - http://127.0.0.1:9001
routes:
  # from HTTPRoute shop: spec.rules[0]
  - name: shop
    match:
      path:
        type: Exact
        value: /cart
      host: shop.example.com
      method: GET
    split:
      v1: 1
    sticky: true
    fallback:
    - v1
""")
    code, out, _ = run(capsys, "--explain", "--json", str(f))
    data = json.loads(out)
    assert (code, data["routes"][0]["from"], data["routes"][0]["name"], [w["path"] for w in data["warnings"]]) == (
        0, "HTTPRoute shop: spec.rules[0]", "shop",
        ["HTTPRoute shop: spec.parentRefs", "HTTPRoute shop: spec.rules[0].backendRefs[0].port"])


def test_errors_name_the_httproute_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(STREAM.replace("turnout/fallback: v1", "turnout/fallbak: v1"))
    assert run(capsys, str(f)) == (1, "", (
        f'{f}: HTTPRoute shop: metadata.annotations["turnout/fallbak"]: unknown turnout annotation (expected one of: '
        "turnout/assignment-cookie, turnout/expose-version, turnout/fallback, turnout/identity, turnout/pins, "
        "turnout/pins-require-verified, turnout/require-identity, turnout/sticky)\n"
        f"{f}: 1 error(s); nothing applied\n"))


def test_the_routes_example_checks(capsys: pytest.CaptureFixture[str]) -> None:
    f = ROOT / "routes" / "httproute-canary.yaml"
    assert run(capsys, str(f)) == (0, f"{f}: OK (2 versions, 2 routes, 0 pins)\n", "")
