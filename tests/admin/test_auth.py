"""proxy/admin/auth.py: every path but the public ones needs a token, whatever the spelling of the path,
the method or the Authorization header."""

from __future__ import annotations

import pytest

from proxy.admin.auth import authorize
from tests.admin.conftest import ALICE, TOKENS, Admin
from tests.raw import raw_exchange

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
    assert out.startswith(b"HTTP/1.1 401 ")
    assert b'"revision"' not in out


# The scheme is case-insensitive and spaces around the token are dropped; anything else is no token.
@pytest.mark.parametrize(("header", "expected"), [
    (f"bearer {ALICE}", "alice"), (f"BEARER  {ALICE} ", "alice"), (f"Bearer\t{ALICE}", None),
    (f"Bearer {ALICE}\x00", None), (f"Bearer {ALICE[:-1]}", None), (f"Bearer {ALICE}{ALICE}", None),
    ("Bearer alice", None),
])
def test_authorize_only_accepts_the_exact_token(header: str, expected: str | None) -> None:
    assert authorize(TOKENS, header) == expected


def test_authorize_with_no_tokens_configured_accepts_nothing() -> None:
    assert authorize({}, "Bearer ") is None
    assert authorize({"": "nobody"}, "Bearer ") is None
    assert authorize({"": "nobody"}, "Bearer") is None
