"""gRPC responses counted by grpc-status: the counter across workers, the Prometheus series, and the canary
analysis taking the error statuses as errors (HTTP 200 though they are). Plus the sans-IO wire helpers."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from proxy.control.canary.analysis import counters_of
from proxy.dataplane import grpcwire
from proxy.dataplane.exchange import ClientSide, Exchange
from proxy.model import Route, State
from proxy.table import RouteTable
from proxy.telemetry.metrics import aggregate, render
from proxy.telemetry.stats import Stats


def test_error_statuses_count_in_the_canary_analysis_and_the_series(tmp_path: Path) -> None:
    s = Stats()
    for _ in range(8):
        s.request("web", "v2", 200, 0.001, 0, 0)
    for _ in range(5):
        s.grpc_response("web", "v2", 0, "", False)
    s.grpc_response("web", "v2", 5, "", False)  # NOT_FOUND: the caller's business
    s.grpc_response("web", "v2", 14, "", True)
    s.grpc_response("web", "v2", 13, "", True)
    # A second worker's published counters are summed in.
    w = Stats()
    w.request("web", "v2", 200, 0.001, 0, 0)
    w.grpc_response("web", "v2", 4, "", True)
    (tmp_path / "w1.json").write_text(json.dumps({"worker": "w1", "time": 9e12, "pid": 1, "ppid": 1,
                                                  "stats": w.snapshot()}))
    snap = aggregate(s, tmp_path)
    assert counters_of(snap, "web", ["v2"]).errors == 3
    assert snap.get("web", "v2").error_ratio == 3 / 9
    body = render(snap, RouteTable(State(routes=(Route("web", split=(("v2", 1.0),)),)), 1), {}).decode()
    (fam,) = [f for f in text_string_to_metric_families(body) if f.name == "turnout_grpc_responses"]
    assert sorted((smp.labels["grpc_status"], smp.value) for smp in fam.samples) == [
        ("0", 5.0), ("13", 1.0), ("14", 1.0), ("4", 1.0), ("5", 1.0)]
    assert {smp.labels["method"] for smp in fam.samples} == {""}


def test_wire_helpers() -> None:
    assert [grpcwire.is_grpc(v) for v in (b"application/grpc", b"application/grpc+proto", b"Application/GRPC",
                                          b"application/grpc-web", b"text/plain")] == [True, True, True, False, False]
    assert [grpcwire.parse_timeout(v) for v in (b"200m", b"1S", b"2H", b"5u", b"123456789S", b"10x", b"m")] == [
        0.2, 1.0, 7200.0, 5e-06, None, None, None]
    assert [grpcwire.parse_status(v) for v in (b"0", b"14", None, b"x")] == [0, 14, 2, 2]
    assert grpcwire.encode_message("100% sure\n") == b"100%25 sure%0A"
    assert grpcwire.head_is_grpc(b"POST /a.B/C HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc\r\n\r\n")
    assert not grpcwire.head_is_grpc(b"POST /a HTTP/1.1\r\nHost: x\r\nX-Content-Type: application/grpc\r\n")


def test_local_answers_by_reason() -> None:
    ex = Exchange(ClientSide(), None)
    assert [grpcwire.local_status(ex, s)[0] for s in (503, 504, 502, 413, 431, 404, 401)] == [
        grpcwire.UNAVAILABLE, grpcwire.DEADLINE_EXCEEDED, grpcwire.UNAVAILABLE, grpcwire.RESOURCE_EXHAUSTED,
        grpcwire.RESOURCE_EXHAUSTED, grpcwire.UNIMPLEMENTED, grpcwire.UNAUTHENTICATED]
    ex.error_kind = "invalid_response"
    assert grpcwire.local_status(ex, 502) == (grpcwire.INTERNAL, "invalid upstream response")
    assert grpcwire.trailers_only(14, "no healthy version") == [
        (b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"14"),
        (b"grpc-message", b"no healthy version")]
