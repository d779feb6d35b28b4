"""gRPC on the wire, as far as a proxy needs it: recognising a call, its `grpc-timeout`, the status its
response ended with, and the answers the proxy makes itself.

Design rules:
- A gRPC call is a request whose content-type is application/grpc or application/grpc+<codec>; nothing
  else about gRPC is parsed (messages pass as opaque DATA).
- An error the proxy makes for a gRPC call is a gRPC response: HTTP 200, trailers-only (one HEADERS
  frame with END_STREAM carrying grpc-status and grpc-message), so a real client shows a status instead
  of a protocol error. The status follows the reason, not just the HTTP status the same error would get
  (gRPC's own mapping for proxies: https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md).
- Counting: a response counts by its grpc-status; the configured set of non-OK statuses are errors (the
  canary analysis adds them to its 5xx count).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from proxy.dataplane.exchange import Exchange
    from proxy.telemetry.stats import Stats

OK: Final = 0
CANCELLED: Final = 1
UNKNOWN: Final = 2
DEADLINE_EXCEEDED: Final = 4
NOT_FOUND: Final = 5
RESOURCE_EXHAUSTED: Final = 8
UNIMPLEMENTED: Final = 12
INTERNAL: Final = 13
UNAVAILABLE: Final = 14
UNAUTHENTICATED: Final = 16

# grpc-timeout units (the gRPC HTTP/2 protocol spec): seconds = value * multiplier / divisor.
_UNITS: Final[dict[int, tuple[int, int]]] = {
    ord("H"): (3600, 1), ord("M"): (60, 1), ord("S"): (1, 1), ord("m"): (1, 1000), ord("u"): (1, 1_000_000),
    ord("n"): (1, 1_000_000_000),
}

# HTTP status of a local answer -> (grpc-status, grpc-message). Upstream failures are refined by their kind.
_LOCAL: Final[dict[int, tuple[int, str]]] = {
    400: (INTERNAL, "malformed request"),
    401: (UNAUTHENTICATED, "no verified client identity"),
    404: (UNIMPLEMENTED, "no route for this method"),
    408: (DEADLINE_EXCEEDED, "request not received in time"),
    413: (RESOURCE_EXHAUSTED, "request too large"),
    421: (UNAVAILABLE, "misdirected request"),
    429: (RESOURCE_EXHAUSTED, "too many requests"),
    431: (RESOURCE_EXHAUSTED, "request headers too large"),
    500: (UNAVAILABLE, "no version to route to"),
    502: (UNAVAILABLE, "upstream unavailable"),
    503: (UNAVAILABLE, "no healthy version"),
    504: (DEADLINE_EXCEEDED, "upstream timed out"),
}
_BY_KIND: Final[dict[str, tuple[int, str]]] = {
    "invalid_response": (INTERNAL, "invalid upstream response"),
    "timeout": (DEADLINE_EXCEEDED, "upstream timed out"),
    "deadline": (DEADLINE_EXCEEDED, "deadline exceeded (grpc-timeout)"),
    "connect_timeout": (UNAVAILABLE, "upstream connect timed out"),
    "connect": (UNAVAILABLE, "upstream unavailable"),
    "tls": (UNAVAILABLE, "upstream TLS handshake failed"),
    "reset": (UNAVAILABLE, "upstream reset the stream"),
}
# Non-OK statuses that count as errors by default: the server's fault or the path's, not the caller's.
DEFAULT_ERROR_CODES: Final = (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, 15)


def is_grpc(content_type: bytes) -> bool:
    return content_type[:16].lower() == b"application/grpc" and content_type[16:17] in (b"", b"+", b";")


def head_is_grpc(head: bytes) -> bool:
    """Whether a request head as the proxy forwards it (HTTP/1.1 lines) carries a gRPC content-type."""
    i = head.lower().find(b"\r\ncontent-type:")
    if i < 0:
        return False
    j = head.find(b"\r\n", i + 15)
    return is_grpc(head[i + 15:j if j >= 0 else len(head)].strip())


def parse_timeout(value: bytes) -> float | None:
    """`grpc-timeout` (1-8 ASCII digits and a unit) in seconds; None when malformed (then ignored)."""
    v = value.strip()
    if not 2 <= len(v) <= 9 or not v[:-1].isdigit():
        return None
    unit = _UNITS.get(v[-1])
    return None if unit is None else int(v[:-1]) * unit[0] / unit[1]


def parse_status(value: bytes | None) -> int:
    """grpc-status as an int; UNKNOWN when absent or malformed (as a client would read it)."""
    if value is None:
        return UNKNOWN
    v = value.strip()
    return int(v) if v.isdigit() and len(v) <= 3 else UNKNOWN


def local_status(ex: Exchange, status: int) -> tuple[int, str]:
    """The grpc-status and message of the answer the proxy makes for ex instead of HTTP `status`."""
    if status in (502, 504) and ex.error_kind:
        return _BY_KIND.get(ex.error_kind, (UNAVAILABLE, "upstream unavailable"))
    return _LOCAL.get(status, (UNKNOWN if status >= 400 else OK, f"proxy status {status}"))


def encode_message(message: str) -> bytes:
    """grpc-message's percent-encoding: UTF-8, bytes outside printable ASCII and '%' as %XX."""
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in message.encode())


def trailers_only(code: int, message: str) -> list[tuple[bytes, bytes]]:
    """The one HEADERS block of a trailers-only response (with :status, for an HTTP/2 client)."""
    return [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", str(code).encode()),
            (b"grpc-message", encode_message(message))]


def h1_answer(stats: Stats, errors: frozenset[int], ex: Exchange, status: int, close: bool) -> bytes:
    """The answer to an HTTP/1.1 client's gRPC call instead of HTTP `status`: the status travels as headers
    of an empty 200 (counted as that grpc-status)."""
    code, message = local_status(ex, status)
    count(stats, ex, code, errors)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\ngrpc-status: %d\r\ngrpc-message: %b\r\n"
            b"Content-Length: 0\r\n%b\r\n" % (code, encode_message(message),
                                              b"Connection: close\r\n" if close else b""))


def count(stats: Stats, ex: Exchange, code: int, errors: frozenset[int]) -> None:
    """Count ex's response by its grpc-status (its method too when the route asks for that label); a status
    in `errors` (settings.grpc_error_codes) is an error of its version."""
    route = ex.route
    if route is None:
        return
    stats.grpc_response(route.name, ex.version, code, ex.path if route.route.grpc_method_label else "",
                        code in errors)
