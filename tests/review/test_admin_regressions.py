"""Attacks on the admin API that are refused correctly today (not already in tests/admin)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from proxy.admin.auth import authorize
from proxy.settings import Settings
from tests.admin.conftest import ALICE, TOKENS, Admin
from tests.review.helpers import raw_exchange

PROBLEM = "application/problem+json"

BYPASS_PATHS = [
    "//api/v1/state", "/api/v1/state/", "/API/v1/state", "/api/v1/%73tate", "/api/v1//state",
    "/healthz/../api/v1/state", "/metrics/../api/v1/state", "/ui/../api/v1/state", "/ui/%2e%2e/api/v1/state",
    "/healthz%2f..%2fapi/v1/state", "/ui/x", "/api/v1/state?x=/healthz", "/healthz;/api/v1/state",
]


@pytest.mark.parametrize("path", BYPASS_PATHS)
@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
async def test_path_and_method_tricks_without_token_are_401(admin: Admin, path: str, method: str) -> None:
    port = int(admin.url.rsplit(":", 1)[1])
    body = b'{"endpoints": ["http://127.0.0.1:9001"]}' if method == "PUT" else b""
    out = await raw_exchange(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                   f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert out.startswith(b"HTTP/1.1 401 ")
    assert b'"revision"' not in out
    assert await admin.revision() == 0


async def test_absolute_form_target_naming_a_public_path_still_needs_a_token(admin: Admin) -> None:
    port = int(admin.url.rsplit(":", 1)[1])
    out = await raw_exchange(port, b"GET http://x/api/v1/state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith((b"HTTP/1.1 401 ", b"HTTP/1.1 400 "))
    assert b'"revision"' not in out


@pytest.mark.parametrize("header", [f"bearer {ALICE}", f"BEARER  {ALICE} ", f"Bearer\t{ALICE}", f"Bearer {ALICE}\x00",
                                    f"Bearer {ALICE[:-1]}", f"Bearer {ALICE}{ALICE}", "Bearer alice"])
def test_authorize_only_accepts_the_exact_token(header: str) -> None:
    expected = "alice" if header.strip().split(None, 1)[-1].strip() == ALICE and header[:7].lower() == "bearer " \
        else None
    assert authorize(TOKENS, header) == expected


def test_authorize_with_no_tokens_configured_accepts_nothing() -> None:
    assert authorize({}, "Bearer ") is None
    assert authorize({"": "nobody"}, "Bearer ") is None
    assert authorize({"": "nobody"}, "Bearer") is None


@pytest.mark.parametrize(("data", "status"), [
    ("[" * 100_000 + "]" * 100_000, 400),
    ('{"v1": 1e999}', 422),
    ('{"v1": -0.0, "v2": 1e-400}', 422),
    ('{"v1": "100"}', 422),
    ('{"v1": true}', 422),
    ('{"v1": Infinity}', 400),
    ('{"v1": 1, "v1": 1}', 400),
    ('{"\\ud800": 1}', 422),
    ("\ufeff{}", 422),
    ('{"v1": ' + "9" * 5000 + "}", 400),
])
async def test_json_edge_cases_never_change_state_or_crash(admin: Admin, data: str, status: int) -> None:
    await admin.seed()
    r = await admin.call("PATCH", "/api/v1/routes/web/split", data=data.encode("utf-8", "surrogatepass"))
    assert (r.status, r.content_type) == (status, PROBLEM)
    assert await admin.revision() == 4


async def test_reads_accept_no_body_driven_mutation(admin: Admin) -> None:
    await admin.seed()
    for path in ("/api/v1/state", "/api/v1/routes/web", "/api/v1/versions/v1", "/api/v1/revisions"):
        r = await admin.call("GET", path, data=json.dumps({"split": {"v2": 100}}))
        assert r.status == 200
    r = await admin.call("GET", "/api/v1/routes/web/rollback")
    assert r.status == 405
    assert await admin.revision() == 4


@pytest.mark.parametrize("value", ['"4', 'W/"4"', "4"])
async def test_if_match_variants_accepted_as_documented(admin: Admin, value: str) -> None:
    await admin.seed()
    r = await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 0}, headers={"If-Match": value})
    assert r.status == 200


# A stale but well-formed revision is a failed precondition (412); anything that is not a revision is a bad
# request (400).
@pytest.mark.parametrize(("value", "status"), [('"3"', 412), ('"4", "5"', 400), ("-4", 400), ("4.0", 400),
                                               ("0x4", 400), ("", 400)])
async def test_if_match_that_is_not_the_current_revision_never_writes(admin: Admin, value: str,
                                                                      status: int) -> None:
    await admin.seed()
    r = await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 10}, headers={"If-Match": value})
    assert r.status == status
    assert await admin.revision() == 4


def test_default_listeners_are_loopback() -> None:
    s = Settings()
    assert s.admin[0] == "127.0.0.1" and s.listen[0] == "127.0.0.1"


async def test_status_page_headers_forbid_framing_and_foreign_scripts(admin: Admin) -> None:
    r = await admin.call("GET", "/ui", token=None)
    assert r.status == 200
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"


UI = Path(__file__).resolve().parents[2] / "proxy" / "admin" / "ui" / "index.html"
# Interpolations of stored strings (route, version, host, prefix, actor, reason, summary) inside HTML templates.
_STORED = re.compile(r"\$\{\s*(?:[a-z]+\.)?(?:name|host|path_prefix|actor|reason|summary|version)\s*\}")


def test_status_page_escapes_every_stored_string_it_interpolates() -> None:
    text = UI.read_text()
    raw = [m.group(0) for m in _STORED.finditer(text)]
    assert raw == [], f"unescaped interpolations in index.html: {raw}"
    assert "const esc = " in text
