"""A version's `protocol:` field and its gRPC health check (`health: {grpc: ...}`): parsing (field-path
errors) and the route-file form.

Design rule: the protocol must agree with the endpoints' scheme, so a version never silently speaks
cleartext where TLS was meant: `h2` is HTTP/2 over TLS (ALPN h2) and needs https:// endpoints, `h2c` is
HTTP/2 in cleartext with prior knowledge and needs http:// ones. Sans-IO: no asyncio, no sockets.
"""

from __future__ import annotations

import re
from typing import Any

from proxy.errors import FieldError
from proxy.model import UpstreamProtocol

PROTOCOLS: tuple[UpstreamProtocol, ...] = ("http1", "h2c", "h2")
# A gRPC service name as grpc.health.v1 names it: dotted identifiers ("" is the whole server).
SERVICE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_protocol(value: object, path: str, kind: str, endpoints: tuple[str, ...]
                   ) -> tuple[UpstreamProtocol, list[FieldError]]:
    """`value` at `path` (the `protocol` field) -> (protocol, errors), checked against the endpoints."""
    if not isinstance(value, str) or value not in PROTOCOLS:
        return "http1", [FieldError(path, f"expected one of {', '.join(PROTOCOLS)}, got {value!r}")]
    proto: UpstreamProtocol = value
    schemes = {e.partition(":")[0] for e in endpoints}
    if proto == "h2" and kind == "static" and schemes and schemes != {"https"}:
        return proto, [FieldError(path, "h2 is HTTP/2 over TLS and needs https:// endpoints (use h2c for "
                                        "cleartext HTTP/2)")]
    if proto == "h2" and kind != "static":
        return proto, [FieldError(path, "h2 needs static https:// endpoints (use h2c for local and docker "
                                        "versions)")]
    if proto == "h2c" and schemes and schemes != {"http"}:
        return proto, [FieldError(path, "h2c is cleartext HTTP/2 and needs http:// endpoints (use h2 for "
                                        "https://)")]
    return proto, []


def parse_grpc_health(value: object, path: str) -> tuple[str | None, list[FieldError]]:
    """`health.grpc`: true (the whole server, service ""), false (an HTTP check), or a service name."""
    if value is True:
        return "", []
    if value is False:
        return None, []
    if isinstance(value, str) and (value == "" or SERVICE_RE.fullmatch(value)):
        return value, []
    return None, [FieldError(path, f"expected true, false or a gRPC service name (package.Service), got {value!r}")]


def protocol_to_dict(protocol: UpstreamProtocol, grpc: str | None, d: dict[str, Any]) -> None:
    """Add the non-default fields to a version's dict (`d`, with its `health` mapping if any)."""
    if protocol != "http1":
        d["protocol"] = protocol
    if grpc is not None:
        d.setdefault("health", {})["grpc"] = grpc if grpc else True
