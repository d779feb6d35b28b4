"""Header rules of the proxy, as precomputed bytes and lookup tables.

Design rule: hop-by-hop headers (RFC 9110 7.6.1) and every header the Connection header names are
removed BEFORE the proxy adds its own, so a client can neither smuggle framing nor spoof what we add.
Header names pass as received; the ones the proxy writes itself are in their usual spelling.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

from httptools import HttpParserError, parse_url

from proxy.dataplane.exchange import Refuse

if TYPE_CHECKING:
    from proxy.dataplane.exchange import Exchange

# Classification of request header names, looked up once per header.
FORWARD: Final = 0
HOST: Final = 1
CONTENT_LENGTH: Final = 2
TRANSFER_ENCODING: Final = 3
CONNECTION: Final = 4
HOP: Final = 5  # dropped
UPGRADE: Final = 6
EXPECT: Final = 7
FORWARDED: Final = 8  # X-Forwarded-*: kept only from trusted peers
OURS: Final = 9  # X-Turnout-*: always replaced by ours

REQUEST_HEADER_KIND: Final[dict[bytes, int]] = {
    b"host": HOST,
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"connection": CONNECTION,
    b"keep-alive": HOP,
    b"proxy-connection": HOP,
    b"te": HOP,
    b"trailer": HOP,
    b"upgrade": UPGRADE,
    b"expect": EXPECT,
    b"x-forwarded-for": FORWARDED,
    b"x-forwarded-proto": FORWARDED,
    b"x-forwarded-host": FORWARDED,
    b"forwarded": FORWARDED,
    b"x-turnout-route": OURS,
    b"x-turnout-version": OURS,
    b"x-turnout-client": OURS,
    b"x-turnout-identity-source": OURS,
}
# Underscore spellings of the headers the proxy sets, trusts or strips: CGI/WSGI-style upstreams read
# X_Forwarded_For as X-Forwarded-For (and Content_Length, Proxy_Connection ... likewise), so a client must not
# be able to slip them past the rules above. Other names with "_" pass. Every mix of "-" and "_" is listed, so
# the request path pays no extra test per header.
for _name in [n for n in REQUEST_HEADER_KIND if b"-" in n]:
    _parts = _name.split(b"-")
    for _mask in range(1, 1 << (len(_parts) - 1)):
        _spelled = _parts[0] + b"".join((b"_" if _mask >> i & 1 else b"-") + p for i, p in enumerate(_parts[1:]))
        REQUEST_HEADER_KIND[_spelled] = HOP
del _name, _parts, _mask, _spelled

# Host header values: reg-name or IP literal, optional port (RFC 3986 3.2.2); no userinfo, no spaces.
_HOST_RE: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")

# Response headers the proxy never passes on as received (framing is re-done, connection is per hop).
RESPONSE_DROP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})

_CRLF: Final = b"\r\n"

# Connection may not name these: Host is end-to-end and what the route was chosen by.
NEVER_HOP: Final = frozenset({b"host"})

# Request header names as received -> lower case. Clients repeat the same few spellings, so one lookup replaces
# a lower() call per header, and the kind lookup that follows finds the name's hash already computed (~400
# instructions per header, callgrind, #17). Bounded like every cache of peer input; a long name (rare, and it
# would pin its bytes) is lowered every time.
LOWER_NAMES: Final[dict[bytes, bytes]] = {}
_LOWER_MAX: Final = 512
_LOWER_NAME_MAX: Final = 64


# Lower-case names of captured headers (plan.WANTED) -> the same as str, the key of Exchange.wanted: one lookup
# of a name from LOWER_NAMES (its hash cached) instead of a decode and the new str's hash, per request.
_WANTED_KEYS: Final[dict[bytes, str]] = {}


def capture(ex: Exchange, n: bytes, value: bytes) -> None:
    """Header n (lower case, a name some route reads) with value into ex.wanted, repeats joined as LazyHeaders
    joins them."""
    k = _WANTED_KEYS.get(n)
    if k is None:
        k = n.decode("latin-1")
        if len(_WANTED_KEYS) >= _LOWER_MAX:
            _WANTED_KEYS.clear()
        _WANTED_KEYS[n] = k
    v = value.decode("latin-1")
    w = ex.wanted
    if w is None:
        ex.wanted = {k: v}
    elif k in w:
        w[k] = w[k] + ("; " if k == "cookie" else ", ") + v
    else:
        w[k] = v


def lower_name(name: bytes) -> bytes:
    """name.lower(), remembered in LOWER_NAMES."""
    n = LOWER_NAMES.get(name)
    if n is not None:
        return n
    n = name.lower()
    if len(name) <= _LOWER_NAME_MAX:
        if len(LOWER_NAMES) >= _LOWER_MAX:
            LOWER_NAMES.clear()
        LOWER_NAMES[name] = n
    return n

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

STATUS_LINES: Final[dict[int, bytes]] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus
}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


def connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def _local_response(status: int, close: bool, extra: bytes = b"") -> bytes:
    body = HTTPStatus(status).phrase.lower().encode() + b"\n"
    conn = b"Connection: close\r\n" if close else b""
    return (status_line(status) + b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body)
            + conn + extra + b"Server: turnout\r\n\r\n" + body)


# Short text responses the proxy answers itself, keyed by (status, close).
LOCAL_STATUSES: Final = (400, 401, 404, 408, 413, 414, 417, 421, 431, 501, 502, 503, 504, 505)
LOCAL_RESPONSES: Final[dict[tuple[int, bool], bytes]] = {
    (s, c): _local_response(s, c) for s in LOCAL_STATUSES for c in (True, False)
}
# 401 of a route with a jwt identity source (RFC 6750 3: the scheme the client should use).
BEARER_401: Final[dict[bool, bytes]] = {
    c: _local_response(401, c, b"WWW-Authenticate: Bearer\r\n") for c in (True, False)
}
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


def local_response(status: int, close: bool) -> bytes:
    r = LOCAL_RESPONSES.get((status, close))
    return r if r is not None else _local_response(status, close)


class TrustedPeers:
    """Which peers may send X-Forwarded-*; decided once per connection."""

    __slots__ = ("_nets",)

    def __init__(self, entries: tuple[str, ...]) -> None:
        self._nets = tuple(ipaddress.ip_network(e, strict=False) for e in entries)

    def __contains__(self, peer: object) -> bool:
        if not self._nets or not isinstance(peer, str):
            return False
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(addr in n for n in self._nets)


class LazyHeaders(Mapping[str, str]):
    """Lower-case str view of forwarded request headers, decoded only if a route or identity asks."""

    __slots__ = ("_d", "_lines")

    def __init__(self, lines: list[bytes]) -> None:
        self._lines = lines  # "Name: value\r\n" as received
        self._d: dict[str, str] | None = None

    def _dict(self) -> dict[str, str]:
        d = self._d
        if d is None:
            d = {}
            for line in self._lines:
                n, _, v = line[:-2].decode("latin-1").partition(": ")
                n = n.lower()
                if n in d:
                    d[n] = d[n] + ("; " if n == "cookie" else ", ") + v
                else:
                    d[n] = v
            self._d = d
        return d

    def get(self, key: str, default: object = None) -> str | None:  # type: ignore[override]
        v = self._dict().get(key)
        return v if v is not None else default  # type: ignore[return-value]

    def __getitem__(self, key: str) -> str:
        return self._dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())


def forwarded_head(ex: Exchange, peer: str, proto: bytes, route_line: bytes) -> bytes:
    """The request head of a trusted peer's request: its X-Forwarded-* chain is extended, not replaced."""
    fwd = ex.fwd
    assert fwd is not None
    parts = [ex.method_b, b" ", ex.target, b" HTTP/1.1\r\n", *ex.lines]
    ext = parts.extend
    prior = fwd.get(b"x-forwarded-for")
    p = peer.encode()
    ext((b"X-Forwarded-For: ", prior + b", " + p if prior else p, _CRLF,
         b"X-Forwarded-Proto: ", fwd.get(b"x-forwarded-proto") or proto, _CRLF))
    host = fwd.get(b"x-forwarded-host") or ex.host_raw
    if host is not None:
        ext((b"X-Forwarded-Host: ", host, _CRLF))
    if b"forwarded" in fwd:
        ext((b"Forwarded: ", fwd[b"forwarded"], _CRLF))
    parts.append(route_line)
    return b"".join(parts)


def valid_host(host: bytes) -> bool:
    return _HOST_RE.fullmatch(host) is not None


def split_host(host: bytes) -> str:
    """Lower-case host without port, from a Host header value."""
    h = host.decode("latin-1").strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[: end + 1] if end > 0 else h
    i = h.rfind(":")
    return h[:i] if i >= 0 else h


# A '%' not followed by two hex digits, or an encoded NUL: a path an upstream cannot decode, or (in C) truncates.
_BAD_PCT: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})|%00")
# The bytes "%" and "?" as ints: `int in bytes` is a memchr, while `b"%" in bytes` first tries the int form and
# fails with a formatted TypeError inside CPython (~1,900 instructions per request, callgrind, #17).
_PERCENT: Final = 0x25
_QUESTION: Final = 0x3F


# -- request validation (raises Refuse; the common case is validated inline in downstream)


def request_target(ex: Exchange, target: bytes) -> None:
    """Origin-form target -> ex.target, ex.path and ex.query (path and query as latin-1 text)."""
    q = target.find(b"?") if _QUESTION in target else -1
    if _PERCENT in target and _BAD_PCT.search(target, 0, q if q >= 0 else len(target)) is not None:
        raise Refuse(400, "bad_request")  # the query is the application's to decode, as nginx leaves it
    ex.target = target
    if q >= 0:
        ex.path = target[:q].decode("latin-1")
        ex.query = target[q + 1:].decode("latin-1")
    else:
        ex.path = target.decode("latin-1")


def validate_request(ex: Exchange, url: bytes, nhost: int, method: str, cl: int | None, max_body: int,
                     hosts: dict[bytes, str]) -> None:
    """The request line and framing headers of anything but the common case; raises Refuse."""
    if method == "CONNECT":
        raise Refuse(400, "bad_request")  # no open proxy
    if nhost > 1 or (nhost == 0 and ex.http11):
        raise Refuse(400, "bad_request")
    if url[:1] == b"/" or (url == b"*" and method == "OPTIONS"):
        target = url
    else:
        try:
            # Untyped on purpose: httptools' stub declares every URL part as bytes/int, but absent parts
            # are None, and compiled (mypyc) code checks declared attribute types at run time.
            parsed: Any = parse_url(url)
        except HttpParserError:
            raise Refuse(400, "bad_request") from None
        if parsed.schema not in (b"http", b"https") or not parsed.host:
            raise Refuse(400, "bad_request")
        authority = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
        if ex.host_raw is None or split_host(authority) != split_host(ex.host_raw):
            raise Refuse(400, "bad_request")  # absolute-form for another host: not an open proxy
        target = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
    request_target(ex, target)
    host_raw = ex.host_raw
    if host_raw is not None:
        ex.host = host_of(hosts, host_raw)
    if ex.upgrade and (ex.chunked or cl):
        raise Refuse(400, "bad_request")
    if ex.upgrade and ex.upgrade_value.strip().lower() != b"websocket":
        # Only WebSocket is tunnelled: another protocol (h2c) would get a raw tunnel past routing and
        # header rules. Proxied as a plain request without Upgrade; llhttp stops parsing at an upgrade,
        # so the connection closes after the response.
        ex.upgrade = False
        ex.keep_alive = False
    if cl is not None and cl > max_body:
        raise Refuse(413, "too_large")


def host_of(hosts: dict[bytes, str], host_raw: bytes) -> str:
    """The lower-case host of a Host value, cached per value (a keep-alive client repeats it)."""
    host = hosts.get(host_raw)
    if host is not None:
        return host
    if not valid_host(host_raw):
        raise Refuse(400, "bad_request")  # userinfo or garbage: routed as one host, read as another
    if len(hosts) > 1000:  # bounded: Host values are client-controlled
        hosts.clear()
    host = hosts[host_raw] = split_host(host_raw)
    return host
