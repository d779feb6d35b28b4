"""A worker's health report lines (proxy.supervisor.worker.health_lines): only changes, one endpoint a line."""

from __future__ import annotations

from proxy.supervisor.worker import health_lines

A = ("v1", "http://127.0.0.1:9001")
B = ("v1", "http://127.0.0.1:9002")


def test_health_lines_report_changes_and_endpoints_gone() -> None:
    assert health_lines({}, {A: True, B: False}) == [
        "health v1 http://127.0.0.1:9001 up\n", "health v1 http://127.0.0.1:9002 down\n"]
    assert health_lines({A: True, B: False}, {A: True, B: False}) == []
    assert health_lines({A: True, B: False}, {A: False}) == [
        "health v1 http://127.0.0.1:9001 down\n", "health v1 http://127.0.0.1:9002 gone\n"]
