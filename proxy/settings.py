"""One frozen Settings object for a proxy process; options are resolved once, at start.

Defaults are the safe ones: listeners on loopback, limits and timeouts on. Every limit says why it has
its value, and the README's limits table mirrors this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Limits:
    # Request line longer than this -> 414. 8 KiB is what nginx and HAProxy accept by default.
    max_request_line: int = 8 * 1024
    # Whole header block larger than this -> 431. 64 KiB covers large cookies and JWTs.
    max_header_bytes: int = 64 * 1024
    # More header fields than this -> 431. HAProxy's default is 101.
    max_headers: int = 100
    # Request body larger than this -> 413. Large enough for typical APIs and uploads; raise per need.
    max_body_bytes: int = 100 * 1024 * 1024
    # Idempotent requests with a body up to this size are buffered so they can be retried on a fallback.
    retry_buffer_bytes: int = 64 * 1024
    # Open client connections per worker; past this a new connection gets a 503 and is closed, so a
    # connection flood cannot exhaust file descriptors and memory (~5 KiB per idle connection).
    max_connections: int = 16_384
    # Pipelined requests parsed but not yet answered per connection before reading pauses.
    max_pipelined: int = 32
    # Write-buffer water marks for flow control in both directions.
    high_water: int = 256 * 1024
    low_water: int = 64 * 1024
    # HTTP/2 (h2 over TLS, h2c): streams open at once per connection, advertised in SETTINGS; a client that
    # opens more is sent GOAWAY. 100 is what nginx and HAProxy advertise.
    h2_max_concurrent_streams: int = 100
    # Streams a client may cancel (RST_STREAM) per connection in one second before it is sent GOAWAY
    # ENHANCE_YOUR_CALM: opening and cancelling streams in a loop is the rapid-reset attack (CVE-2023-44487).
    h2_max_resets: int = 100
    # SETTINGS, PING, PRIORITY and empty DATA frames a client may send per connection in one second before
    # GOAWAY ENHANCE_YOUR_CALM: each costs work (and an answer) and carries no request.
    h2_max_control_frames: int = 200
    # Upstream connections open (or being opened) per endpoint at once. Past it an exchange waits, first come
    # first served, for one to come free (bounded by upstream_connect -> 504) instead of opening another: a
    # burst of HTTP/2 streams (each needs its own HTTP/1.1 connection) must not become a storm of connects.
    max_upstream_connections: int = 256


@dataclass(frozen=True, slots=True)
class Timeouts:
    header_read: float = 10.0  # whole request head must arrive within this -> 408 (slowloris)
    keepalive_idle: float = 75.0  # idle client connection between requests
    upstream_connect: float = 3.0  # -> 504 (or fallback, when one is left)
    upstream_response: float = 60.0  # request sent -> response head received; -> 504
    upstream_idle: float = 60.0  # no byte from the upstream while reading a body
    upstream_pool_idle: float = 30.0  # idle pooled upstream connection is closed after this
    body_read_idle: float = 60.0  # no byte from the client while reading its body
    shutdown_grace: float = 30.0  # SIGTERM: in-flight requests may finish within this


@dataclass(frozen=True, slots=True)
class Certificate:
    cert: str  # PEM certificate chain file
    key: str  # PEM private key file


@dataclass(frozen=True, slots=True)
class TlsConfig:
    # SNI picks the certificate whose names match the client's server name; the first is the default.
    certificates: tuple[Certificate, ...]
    client_ca: str | None = None  # ask for a client certificate and verify it against this CA file
    client_cert: str = "optional"  # optional | required (only with client_ca)
    min_version: str = "1.2"  # "1.2" or "1.3": TLS 1.0 and 1.1 are refused


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    address: tuple[str, int]
    tls: TlsConfig | None = None  # None: cleartext
    protocols: tuple[str, ...] = ("http/1.1",)  # offered by ALPN on a TLS listener


@dataclass(frozen=True, slots=True)
class Settings:
    listen: tuple[str, int] = ("127.0.0.1", 8080)  # the first listener's address
    admin: tuple[str, int] = ("127.0.0.1", 8081)
    workers: int = 1
    store: str | None = None  # sqlite:///path (default path when None) or etcd://host:port/prefix
    routes: str | None = None  # route file seeding/updating the store (see the restart rule)
    admin_token_file: str | None = None
    metrics_auth: bool = False  # require the admin token on /metrics too
    trusted_proxies: tuple[str, ...] = ()  # peers whose X-Forwarded-* are kept (IPs or CIDRs)
    access_log: str | None = None  # path, "-" for stdout, None for off
    access_log_client_ids: bool = False  # log raw client ids instead of a salted hash
    pool_size: int = 64  # idle keep-alive connections kept per upstream endpoint
    passive_eject_after: int = 5  # consecutive connect failures / timeouts / 5xx that eject an endpoint
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    state_dir: str | None = None  # where the admin token and default database live
    # Every listener of the proxy; empty means one cleartext listener on `listen` (see listeners_of).
    listeners: tuple[Listener, ...] = ()
    # Live versions' check commands run again this often (seconds): a scanner's database grows, so a pass
    # from last week says little about today. A day is what image scanners' feeds update in.
    check_interval: float = 86400.0
    # The zone this replica runs in (proxy.zones): endpoints there first. None: zones play no part.
    zone: str | None = None
    # Docker engines, one per zone: (zone, engine URL like unix:///run/a.sock); empty: the default engine.
    docker_engines: tuple[tuple[str, str], ...] = ()
    # grpc-status values a gRPC response counts as an error with (metrics, canary analysis): UNKNOWN,
    # DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS. The others (NOT_FOUND,
    # INVALID_ARGUMENT, ...) are the caller's business, like a 4xx.
    grpc_error_codes: tuple[int, ...] = (2, 4, 12, 13, 14, 15)


def listeners_of(settings: Settings) -> tuple[Listener, ...]:
    return settings.listeners or (Listener("default", settings.listen),)
