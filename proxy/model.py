"""The routing model: versions, routes and the whole state, as frozen data.

Design rule: nothing here does I/O or imports asyncio/aiohttp. A version's *spec* never changes once
registered (immutable infrastructure: a release is a new version); only its instances (endpoints) come
and go. Changes produce a new State through `dataclasses.replace`; nothing is mutated in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

VersionKind = Literal["static", "local", "docker"]
IdentityKind = Literal["header", "cookie", "query", "client_cert", "jwt", "api_key"]
# Sources whose id the proxy checked itself (a CA-verified certificate, a signed token, a key table).
VERIFIED_KINDS = frozenset({"client_cert", "jwt", "api_key"})
CertField = Literal["san_dns", "san_uri", "subject_cn", "fingerprint_sha256"]
NetworkMode = Literal["bridge", "host"]
CheckFailAction = Literal["flag", "shift"]
# How the proxy speaks to a version's endpoints: HTTP/1.1, HTTP/2 in cleartext (prior knowledge), or HTTP/2
# over TLS (ALPN h2, https:// endpoints).
UpstreamProtocol = Literal["http1", "h2c", "h2"]


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str = "/"
    interval: float = 2.0
    timeout: float = 1.0
    # None: an HTTP GET of `path`. A string: grpc.health.v1.Health/Check for that service ("" = the whole
    # server), which a gRPC version answers instead of plain HTTP.
    grpc: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """How a version's https:// endpoints are verified (files are paths as the proxy process sees them)."""

    ca: str | None = None  # PEM CA bundle; None: the system's trust store
    server_name: str | None = None  # SNI and the name the certificate must carry; None: the endpoint's host
    verify: bool = True  # False only with the file's explicit insecure_skip_verify
    client_cert: str | None = None  # PEM certificate presented to the upstream (mTLS), with client_key
    client_key: str | None = None


@dataclass(frozen=True, slots=True)
class VersionSpec:
    """Where a version's instances come from. Compared whole to refuse re-registration with changes."""

    kind: VersionKind
    endpoints: tuple[str, ...] = ()  # static: the instances themselves, as http(s)://host:port URLs
    command: tuple[str, ...] = ()  # local: argv of a process; PORT is set in its environment
    image: str | None = None  # docker: repo@sha256:... (a tag only with allow_tag, then resolved)
    allow_tag: bool = False
    replicas: int = 1
    port: int | None = None  # docker: the container's listening port
    env: tuple[tuple[str, str], ...] = ()
    network: NetworkMode = "bridge"
    health: HealthCheck = field(default_factory=HealthCheck)
    labels: tuple[tuple[str, str], ...] = ()
    check: tuple[str, ...] = ()  # gate command that must exit 0 before the version may get traffic
    tls: UpstreamTLS | None = None  # static https:// endpoints only; None there means verified defaults
    # A re-check failing while the version receives traffic: "flag" it only, or also "shift" its traffic to
    # each route's fallback (proxy.control.rechecks).
    on_check_fail: CheckFailAction = "flag"
    # Zones (proxy.zones): static: (endpoint URL, zone) for the endpoints given with one; local: at most one,
    # where its processes run (none: the proxy's); docker: the zones (engines) replicas are spread over.
    endpoint_zones: tuple[tuple[str, str], ...] = ()
    zones: tuple[str, ...] = ()
    protocol: UpstreamProtocol = "http1"


@dataclass(frozen=True, slots=True)
class Version:
    name: str
    spec: VersionSpec
    # Current instances. For static versions this is spec.endpoints; providers update it for the others.
    endpoints: tuple[str, ...]
    created: float = 0.0
    # (endpoint URL, zone) of the current instances whose zone is known (static: spec.endpoint_zones).
    zones: tuple[tuple[str, str], ...] = ()


PathType = Literal["Exact", "PathPrefix", "RegularExpression"]
PATH_TYPES: tuple[PathType, ...] = ("Exact", "PathPrefix", "RegularExpression")


@dataclass(frozen=True, slots=True)
class Match:
    """One match; its fields are ANDed. A route's matches are ORed (Route.matches)."""

    host: str | None = None  # exact host, or "*.example.com"
    # The path value: the prefix (PathPrefix), the whole path (Exact) or an re2 pattern (RegularExpression).
    path_prefix: str = "/"
    headers: tuple[tuple[str, str], ...] = ()  # lower-case name, exact value
    path_type: PathType = "PathPrefix"
    method: str | None = None  # upper-case; None: any method
    header_regex: tuple[tuple[str, str], ...] = ()  # lower-case name, re2 pattern the whole value matches
    query: tuple[tuple[str, str], ...] = ()  # parameter name (case-sensitive), exact value
    query_regex: tuple[tuple[str, str], ...] = ()

    @property
    def path(self) -> str:
        return self.path_prefix

    @property
    def specificity(self) -> tuple[int, int, int]:
        host_rank = 0 if self.host is None else (1 if self.host.startswith("*.") else 2)
        return (host_rank, len(self.path_prefix), len(self.headers) + len(self.header_regex))

    @property
    def plain(self) -> bool:
        """Only what a match could say before typed paths, methods, regexes and queries."""
        return (self.path_type == "PathPrefix" and self.method is None and not self.header_regex
                and not self.query and not self.query_regex)


@dataclass(frozen=True, slots=True)
class JwtSource:
    """A bearer token in a header ("Bearer <token>") or a cookie, verified against a key file."""

    header: str | None = "authorization"  # lower-case; None when the token is in `cookie`
    cookie: str | None = None
    claim: tuple[str, ...] = ("sub",)  # dotted path, split
    keys: str | None = None  # JWKS file (asymmetric algorithms)
    secret: str | None = None  # file holding the shared secret (HS* algorithms)
    algorithms: tuple[str, ...] = ()
    issuer: str | None = None
    audience: str | None = None


@dataclass(frozen=True, slots=True)
class ApiKeySource:
    header: str  # lower-case
    keys: str  # file of lines "client-id sha256-hex-of-key"


@dataclass(frozen=True, slots=True)
class IdentitySource:
    """`name`: the header, cookie or parameter (header/cookie/query), the certificate field (client_cert),
    or the header the key or token is read from (api_key, jwt; "cookie" for a jwt in a cookie)."""

    kind: IdentityKind
    name: str
    jwt: JwtSource | None = None
    api_key: ApiKeySource | None = None

    @property
    def verified(self) -> bool:
        return self.kind in VERIFIED_KINDS


@dataclass(frozen=True, slots=True)
class Mirror:
    version: str
    percent: float


# Filters, timeouts and retry: HTTPRoute's semantics in turnout's own model (one model, two syntaxes).

@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """HTTPRoute's HeaderModifier: set (replace), add (append), remove; names as written, matched
    case-insensitively."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


PathEditType = Literal["ReplaceFullPath", "ReplacePrefixMatch"]


@dataclass(frozen=True, slots=True)
class PathEdit:
    type: PathEditType
    value: str


@dataclass(frozen=True, slots=True)
class Rewrite:
    hostname: str | None = None
    path: PathEdit | None = None


@dataclass(frozen=True, slots=True)
class Redirect:
    """Answered by the proxy itself; None fields keep the request's own (port: see the redirect docs)."""

    scheme: str | None = None  # "http" | "https"
    hostname: str | None = None
    port: int | None = None
    path: PathEdit | None = None
    status: int = 302


@dataclass(frozen=True, slots=True)
class Filters:
    request_headers: HeaderEdit | None = None
    response_headers: HeaderEdit | None = None
    rewrite: Rewrite | None = None
    redirect: Redirect | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    request: float | None = None  # whole exchange, from the request head to the end of the response
    backend_request: float | None = None  # one attempt: request sent -> response head


@dataclass(frozen=True, slots=True)
class Retry:
    """GEP-1731: `attempts` retries (after the first try) when the upstream answers one of `codes`."""

    attempts: int = 1
    codes: tuple[int, ...] = ()
    backoff: float = 0.0


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: Match = field(default_factory=Match)
    identity: tuple[IdentitySource, ...] = ()
    # Insertion order is the order versions occupy sticky buckets: keep it stable, append new versions.
    split: tuple[tuple[str, float], ...] = ()
    sticky: bool = True
    pins: Mapping[str, str] = field(default_factory=dict)
    fallback: tuple[str, ...] = ()
    # Copies of a sample of the requests: one draw per request decides for all of them (a request drawn at
    # p goes to every mirror whose percent is above p), so mirrors of equal percent see the same requests.
    mirrors: tuple[Mirror, ...] = ()
    expose_version: bool = False
    # Drain support: name of a cookie recording the version a session was assigned (None: off).
    assignment_cookie: str | None = None
    # The assignment cookie's Max-Age in seconds (HTTPRoute sessionPersistence absoluteTimeout with a
    # Permanent cookie); None: a session cookie, kept until the browser closes.
    assignment_cookie_max_age: int | None = None
    # Pins and the assignment cookie only for ids from verified sources (an unverified one stays sticky).
    pins_require_verified: bool = False
    # No verified id: 401, nothing goes upstream.
    require_identity: bool = False
    # Endpoints of the chosen version in the proxy's own zone first (proxy.zones); False: round robin over all.
    zone_affinity: bool = True

    @property
    def mirror(self) -> Mirror | None:
        """The first mirror (what readers written for one mirror per route show)."""
        return self.mirrors[0] if self.mirrors else None
    # Matches ORed with `match` (a route file's `matches:` list is (match, *more_matches)).
    more_matches: tuple[Match, ...] = ()
    filters: Filters | None = None
    version_filters: tuple[tuple[str, Filters], ...] = ()  # per version (HTTPRoute backendRefs[].filters)
    timeouts: Timeouts | None = None
    retry: Retry | None = None

    @property
    def matches(self) -> tuple[Match, ...]:
        return (self.match, *self.more_matches)
    # gRPC responses are counted with their method (":path") as a label too; off by default (cardinality).
    grpc_method_label: bool = False

    @property
    def split_map(self) -> dict[str, float]:
        return dict(self.split)

    def referenced_versions(self) -> set[str]:
        names = {v for v, _ in self.split} | set(self.pins.values()) | set(self.fallback)
        names.update(m.version for m in self.mirrors)
        names.update(v for v, _ in self.version_filters)
        return names


@dataclass(frozen=True, slots=True)
class State:
    versions: Mapping[str, Version] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()  # file order breaks ties between equally specific matches

    def route(self, name: str) -> Route | None:
        for r in self.routes:
            if r.name == name:
                return r
        return None

    def users_of(self, version: str) -> list[str]:
        return [r.name for r in self.routes if version in r.referenced_versions()]


EMPTY_STATE = State()
