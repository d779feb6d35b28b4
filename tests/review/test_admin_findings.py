"""Admin API problems found in review. Each test asserts the CORRECT behaviour and is a strict xfail until
the fix lands (then remove the marker)."""

from __future__ import annotations

import pytest

from proxy.errors import ValidationError
from proxy.model import State
from proxy.parse import parse_route_body, parse_version_body
from tests.admin.conftest import ALICE, EP1, Admin
from tests.review.helpers import raw_exchange

PROBLEM = "application/problem+json"


async def test_version_name_with_trailing_newline_is_refused(admin: Admin) -> None:
    r = await admin.call("PUT", "/api/v1/versions/v1%0A", {"endpoints": [EP1]})
    assert (r.status, r.content_type) == (422, PROBLEM)
    assert admin.ctx.holder.table.versions == {}
    assert await admin.revision() == 0


@pytest.mark.parametrize(("field", "body"), [
    ("name", {"split": {"v1": 1}}),
    ("match.host", {"match": {"host": "app.example\n"}, "split": {"v1": 1}}),
    ("match.path_prefix", {"match": {"path_prefix": "/api\n"}, "split": {"v1": 1}}),
    ("assignment_cookie", {"split": {"v1": 1}, "assignment_cookie": "tv\n"}),
    ("identity", {"split": {"v1": 1}, "identity": [{"header": "X-Client-Id\n"}]}),
])
def test_route_fields_with_trailing_newline_are_refused(field: str, body: dict[str, object]) -> None:
    state = State(versions={"v1": parse_version_body({"endpoints": [EP1]}, "v1", 0.0)})
    name = "web\n" if field == "name" else "web"
    with pytest.raises(ValidationError):
        parse_route_body(body, name, state)


CRASHES = {
    "if_match_superscript_digit": ("PUT", "/api/v1/versions/v9", {"If-Match": '"\u00b2"'}, 400),
    "if_match_5000_digits": ("PUT", "/api/v1/versions/v9", {"If-Match": '"' + "9" * 5000 + '"'}, 400),
    "limit_superscript_digit": ("GET", "/api/v1/revisions?limit=%C2%B2", {}, 400),
    "before_5000_digits": ("GET", "/api/v1/revisions?before=" + "9" * 5000, {}, 400),
    "revision_superscript_digit": ("GET", "/api/v1/revisions/%C2%B2", {}, 400),
    "revision_beyond_int64": ("GET", "/api/v1/revisions/99999999999999999999999", {}, 400),
}


@pytest.mark.parametrize("name", sorted(CRASHES))
async def test_odd_numbers_in_headers_and_paths_are_client_errors(admin: Admin, name: str) -> None:
    method, path, headers, status = CRASHES[name]
    body = b'{"endpoints": ["http://127.0.0.1:9001"]}' if method == "PUT" else b""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    port = admin.url.rsplit(":", 1)[1]
    raw = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {ALICE}\r\n"
           f"Content-Length: {len(body)}\r\n{head}\r\n").encode() + body
    out = await raw_exchange(int(port), raw)
    assert out.startswith(b"HTTP/1.1 %d " % status)
    assert await admin.revision() == 0
