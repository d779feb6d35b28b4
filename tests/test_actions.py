"""proxy/actions.py: HTTPRoute's ReplacePrefixMatch table, redirect Locations, header edits on forwarded lines."""

from __future__ import annotations

import pytest

from proxy.actions import HeaderOps, redirect_location, replace_prefix, with_host
from proxy.model import HeaderEdit, PathEdit, Redirect


# The table of HTTPURLRewriteFilter / HTTPPathModifier in the Gateway API spec (apis/v1/httproute_types.go).
@pytest.mark.parametrize(("path", "prefix", "value", "expected"), [
    ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
    ("/foo", "/foo", "/xyz", "/xyz"),
    ("/foo/", "/foo", "/xyz", "/xyz/"),
    ("/foo/bar", "/foo", "", "/bar"),
    ("/foo/", "/foo", "", "/"),
    ("/foo", "/foo", "", "/"),
    ("/foo/", "/foo", "/", "/"),
    ("/foo", "/foo", "/", "/"),
])
def test_replace_prefix_match_as_the_spec_tabulates(path: str, prefix: str, value: str, expected: str) -> None:
    assert replace_prefix(path, prefix, value) == expected


def test_redirect_location_ports() -> None:
    def loc(r: Redirect, scheme: str = "http", port: int = 8080) -> str:
        return redirect_location(r, scheme, "shop.example", port, "/a/b", "/a", "q=1")

    assert loc(Redirect()) == "http://shop.example:8080/a/b?q=1"  # the listener's port
    assert loc(Redirect(), port=80) == "http://shop.example/a/b?q=1"
    assert loc(Redirect(scheme="https")) == "https://shop.example/a/b?q=1"  # the scheme's well-known port
    assert loc(Redirect(scheme="http"), scheme="https", port=443) == "http://shop.example/a/b?q=1"
    assert loc(Redirect(port=443), scheme="https") == "https://shop.example/a/b?q=1"
    assert loc(Redirect(hostname="h", port=8443, path=PathEdit("ReplaceFullPath", "/x"))) == "http://h:8443/x?q=1"
    assert loc(Redirect(path=PathEdit("ReplacePrefixMatch", "/new"))) == "http://shop.example:8080/new/b?q=1"


def test_header_ops_set_add_remove_case_insensitively_and_host_rewrite() -> None:
    ops = HeaderOps(HeaderEdit(set=(("X-A", "1"),), add=(("X-B", "2"),), remove=("x-c",)))
    lines = [b"Host: shop\r\n", b"x-a: old\r\n", b"X-B: first\r\n", b"X-C: gone\r\n", b"Accept: */*\r\n"]
    out = ops.apply(lines)
    assert out == [b"Host: shop\r\n", b"X-B: first\r\n", b"Accept: */*\r\n", b"X-A: 1\r\n", b"X-B: 2\r\n"]
    assert lines[1] == b"x-a: old\r\n"  # the received lines are left as they were
    assert with_host(out, b"Host: api.internal\r\n")[0] == b"X-B: first\r\n"
    assert with_host(out, b"Host: api.internal\r\n")[-1] == b"Host: api.internal\r\n"
