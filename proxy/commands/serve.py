"""`turnout serve`: run the proxy (and its admin API) from a store, optionally seeded by a route file.

Design rule: this module turns command-line options into Settings (every field of proxy.settings has its
option) and hands them to proxy.supervisor; it imports the supervisor only when a proxy starts."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from proxy.config import LIMIT_MINIMUM, parse_config
from proxy.errors import ValidationError
from proxy.placement import ZONE_RE, ZONE_WHAT
from proxy.settings import Certificate, Limits, Listener, Settings, Timeouts, TlsConfig

# What each limit and timeout flag sets; a field missing here still gets its flag (the flags are made
# from the dataclasses' fields, so they cannot drift), with a plainer help text.
LIMIT_HELP = {
    "max_request_line": "longest request line in bytes; longer -> 414",
    "max_header_bytes": "largest request header block in bytes; larger -> 431",
    "max_headers": "most request header fields; more -> 431",
    "max_body_bytes": "largest request body in bytes; larger -> 413",
    "retry_buffer_bytes": "idempotent request bodies up to this many bytes are kept for a retry on a fallback",
    "max_connections": "open client connections per worker; past this a new one gets a 503 and is closed",
    "max_pipelined": "pipelined requests parsed but not yet answered per connection before reading pauses",
    "high_water": "write buffer bytes above which reading from the other side pauses",
    "low_water": "write buffer bytes below which reading resumes",
}
TIMEOUT_HELP = {
    "header_read": "the whole request head must arrive within this -> 408",
    "keepalive_idle": "an idle client connection between requests is closed after this",
    "upstream_connect": "connecting to an upstream -> 504 (or the fallback)",
    "upstream_response": "request sent until the response head -> 504",
    "upstream_idle": "no byte from the upstream while reading its body",
    "upstream_pool_idle": "an idle pooled upstream connection is closed after this",
    "body_read_idle": "no byte from the client while reading its body",
}


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def add_serve_options(p: argparse.ArgumentParser, *, listen: str = "127.0.0.1:8080",
                      admin: str = "127.0.0.1:8081") -> None:
    # Options the config file can set default to None (unset), so a flag given overrides the file and the
    # file overrides the built-in default (kept in default_listen / default_admin and the dataclasses).
    p.set_defaults(default_listen=host_port(listen), default_admin=host_port(admin))
    p.add_argument("--config", metavar="FILE", help="static configuration file (YAML): listeners, TLS, admin, "
                   "workers, limits, timeouts, trusted_proxies, access_log; flags override it")
    p.add_argument("--listen", type=host_port, default=None, metavar="HOST:PORT",
                   help=f"one cleartext proxy listener instead of the file's (default {listen})")
    p.add_argument("--tls-cert", metavar="FILE", help="with --tls-key: the --listen listener speaks TLS")
    p.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert")
    p.add_argument("--http2", action="store_true", help="the --listen listener also speaks HTTP/2: h2 by ALPN with "
                   "--tls-cert, else h2c (prior knowledge; an HTTP/1.1 Upgrade: h2c is never honoured)")
    p.add_argument("--admin", type=host_port, default=None, metavar="HOST:PORT",
                   help=f"admin API listener (default {admin}; keep it on loopback)")
    p.add_argument("--store", metavar="URL", default=os.environ.get("TURNOUT_STORE"),
                   help="sqlite:///path (default: state.db in the state dir, see --state-dir)"
                   " or etcd://host:port/prefix")
    p.add_argument("--workers", type=int, default=None,
                   help="data-plane processes sharing the port (SO_REUSEPORT; default 1)")
    p.add_argument("--admin-token-file", metavar="FILE", help="bearer tokens: one token, or lines NAME:TOKEN")
    p.add_argument("--metrics-auth", action="store_true", help="require the admin token on /metrics too")
    p.add_argument("--trusted-proxy", action="append", default=None, metavar="IP/CIDR",
                   help="peer whose X-Forwarded-* headers are kept (repeatable)")
    p.add_argument("--access-log", metavar="PATH|-", help="JSON access log (off by default)")
    p.add_argument("--log-client-ids", action="store_true", help="log raw client ids instead of salted hashes")
    p.add_argument("--check-interval", type=_seconds(zero_ok=False), default=None, metavar="SECONDS",
                   help="re-run the check command of every version that receives traffic this often "
                   "(default 86400: a day)")
    p.add_argument("--zone", type=_zone, default=None, metavar="ZONE",
                   help="the zone this proxy runs in: endpoints of the chosen version there are used first")
    # A grace of 0 is meaningful (stop at once); a timeout of 0 would refuse everything.
    p.add_argument("--shutdown-grace", type=_seconds(zero_ok=True), default=None, metavar="SECONDS",
                   help=f"on SIGTERM, in-flight requests may finish within this (default {Timeouts().shutdown_grace})")
    p.add_argument("--state-dir", metavar="DIR", default=os.environ.get("TURNOUT_STATE_DIR"),
                   help="admin token, default database and local-process records (default: $TURNOUT_STATE_DIR or "
                   "~/.local/state/turnout)")
    g = p.add_argument_group("limits", "per worker process; defaults are in proxy/settings.py")
    for f in dataclasses.fields(Limits):
        g.add_argument(_flag("", f.name), dest=f"limit_{f.name}", type=_whole(LIMIT_MINIMUM.get(f.name, 1)),
                       default=None, metavar="N",
                       help=f"{LIMIT_HELP.get(f.name, f.name)} (default {getattr(Limits(), f.name)})")
    g = p.add_argument_group("timeouts", "in seconds")
    for f in dataclasses.fields(Timeouts):
        if f.name == "shutdown_grace":  # has its own flag above
            continue
        g.add_argument(_flag("timeout-", f.name), dest=f"timeout_{f.name}", type=_seconds(zero_ok=False),
                       default=None, metavar="SECONDS",
                       help=f"{TIMEOUT_HELP.get(f.name, f.name)} (default {getattr(Timeouts(), f.name)})")


def _zone(text: str) -> str:
    if not ZONE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected {ZONE_WHAT}, got {text!r}")
    return text


def _flag(prefix: str, name: str) -> str:
    return "--" + prefix + name.replace("_", "-")


def _whole(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return n

    return parse


def _seconds(zero_ok: bool) -> Callable[[str], float]:
    bound = ">= 0" if zero_ok else "> 0"

    def parse(text: str) -> float:
        try:
            t = float(text)
        except ValueError:
            t = math.nan
        if not math.isfinite(t) or t < 0 or (t == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(f"expected a number of seconds {bound}, got {text!r}")
        return t

    return parse


def read_config(path: str) -> dict[str, Any]:
    """The fields `--config FILE` sets, or SystemExit(1) with one line per error (field paths)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        print(f"turnout: {path}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(1) from e
    try:
        return parse_config(text, os.path.dirname(os.path.abspath(path)))
    except ValidationError as e:
        for err in e.errors:
            print(f"turnout: {path}: {err}", file=sys.stderr)
        raise SystemExit(1) from e


def _listeners(args: argparse.Namespace, file: dict[str, Any]) -> tuple[Listener, ...]:
    tls_flags: tuple[str | None, str | None] = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if (tls_flags[0] is None) != (tls_flags[1] is None):
        print(f"turnout {args.command}: error: --tls-cert and --tls-key go together", file=sys.stderr)
        raise SystemExit(2)
    if args.listen is None and "listeners" in file:
        if tls_flags[0] is not None:
            print(f"turnout {args.command}: error: --tls-cert needs --listen when the config file has listeners "
                  "(it makes that one listener TLS)", file=sys.stderr)
            raise SystemExit(2)
        return tuple(file["listeners"])
    addr = args.listen or args.default_listen
    http2 = getattr(args, "http2", False)
    if tls_flags[0] is None:
        if http2:
            return (Listener("default", addr, protocols=("http/1.1", "h2c")),)
        return ()  # one cleartext listener on `listen`: the default shape (settings.listeners_of)
    cert, key = os.path.abspath(tls_flags[0]), os.path.abspath(tls_flags[1] or "")
    tls = TlsConfig(certificates=(Certificate(cert, key),))
    return (Listener("default", addr, tls=tls, protocols=("h2", "http/1.1") if http2 else ("http/1.1",)),)


def settings_from_args(args: argparse.Namespace, routes: str | None) -> Settings:
    config = getattr(args, "config", None)
    file = read_config(config) if config else {}
    workers = args.workers if args.workers is not None else file.get("workers", 1)
    if workers < 1:
        raise SystemExit("turnout: --workers must be at least 1")
    flimits, ftimeouts = file.get("limits", {}), file.get("timeouts", {})

    def pick(flag: Any, from_file: Any, default: Any) -> Any:
        return flag if flag is not None else from_file if from_file is not None else default

    limits = Limits(**{f.name: pick(getattr(args, f"limit_{f.name}"), flimits.get(f.name), getattr(Limits(), f.name))
                       for f in dataclasses.fields(Limits)})
    if limits.low_water > limits.high_water:
        print(f"turnout {args.command}: error: --low-water ({limits.low_water}) must not exceed --high-water "
              f"({limits.high_water})", file=sys.stderr)
        raise SystemExit(2)
    timeouts = Timeouts(**{f.name: pick(getattr(args, f"timeout_{f.name}", None) if f.name != "shutdown_grace"
                                        else args.shutdown_grace, ftimeouts.get(f.name), getattr(Timeouts(), f.name))
                           for f in dataclasses.fields(Timeouts)})
    listeners = _listeners(args, file)
    listen = listeners[0].address if listeners else (args.listen or args.default_listen)
    trusted = args.trusted_proxy if args.trusted_proxy is not None else file.get("trusted_proxies", ())
    return Settings(
        listen=listen, admin=pick(args.admin, file.get("admin"), args.default_admin), workers=workers,
        store=args.store, routes=routes,
        admin_token_file=args.admin_token_file, metrics_auth=args.metrics_auth,
        trusted_proxies=tuple(trusted), access_log=pick(args.access_log, file.get("access_log"), None),
        access_log_client_ids=args.log_client_ids,
        check_interval=pick(getattr(args, "check_interval", None), file.get("check_interval"), 86400.0),
        limits=limits, timeouts=timeouts,
        state_dir=args.state_dir, listeners=listeners,
        zone=pick(getattr(args, "zone", None), file.get("zone"), None),
        docker_engines=file.get("docker_engines", ()),
    )


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the proxy and its admin API", description=__doc__ + """

Restart rule: --routes seeds an empty store; on later starts the file is applied as a new revision only
when its content changed since it was last applied, so live changes made through the admin API survive
restarts.""", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routes", metavar="FILE", help="route file (YAML) to seed or update the store")
    add_serve_options(p)
    p.set_defaults(func="proxy.commands.running:serve")

    w = sub.add_parser("_worker")  # internal: one data-plane worker process; hidden from --help below
    w.add_argument("--id", required=True)
    w.add_argument("--settings-json", required=True)
    # One per listener, in the order of settings.listeners_of (a supervisor of the previous release passes one).
    w.add_argument("--listen-fd", type=int, action="append", default=None)
    w.add_argument("--ready-fd", type=int, default=None)
    w.set_defaults(func="proxy.commands.running:worker")
    sub._choices_actions = [a for a in sub._choices_actions if a.dest != "_worker"]
