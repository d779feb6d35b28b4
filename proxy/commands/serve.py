"""`turnout serve`: run the proxy (and its admin API) from a store, optionally seeded by a route file."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from proxy.errors import TurnoutError, ValidationError
from proxy.settings import Settings, Timeouts


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def add_serve_options(p: argparse.ArgumentParser, *, listen: str = "127.0.0.1:8080",
                      admin: str = "127.0.0.1:8081") -> None:
    p.add_argument("--listen", type=host_port, default=host_port(listen), metavar="HOST:PORT",
                   help=f"proxy listener (default {listen})")
    p.add_argument("--admin", type=host_port, default=host_port(admin), metavar="HOST:PORT",
                   help=f"admin API listener (default {admin}; keep it on loopback)")
    p.add_argument("--store", metavar="URL", default=os.environ.get("TURNOUT_STORE"),
                   help="sqlite:///path (default: state.db in the state dir, see --state-dir)"
                   " or etcd://host:port/prefix")
    p.add_argument("--workers", type=int, default=1, help="data-plane processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--admin-token-file", metavar="FILE", help="bearer tokens: one token, or lines NAME:TOKEN")
    p.add_argument("--metrics-auth", action="store_true", help="require the admin token on /metrics too")
    p.add_argument("--trusted-proxy", action="append", default=[], metavar="IP/CIDR",
                   help="peer whose X-Forwarded-* headers are kept (repeatable)")
    p.add_argument("--access-log", metavar="PATH|-", help="JSON access log (off by default)")
    p.add_argument("--log-client-ids", action="store_true", help="log raw client ids instead of salted hashes")
    p.add_argument("--shutdown-grace", type=float, default=Timeouts().shutdown_grace, metavar="SECONDS",
                   help="on SIGTERM, in-flight requests may finish within this")
    p.add_argument("--state-dir", metavar="DIR", default=os.environ.get("TURNOUT_STATE_DIR"),
                   help="admin token, default database and local-process records (default: $TURNOUT_STATE_DIR or "
                   "~/.local/state/turnout)")


def settings_from_args(args: argparse.Namespace, routes: str | None) -> Settings:
    if args.workers < 1:
        raise SystemExit("turnout: --workers must be at least 1")
    return Settings(
        listen=args.listen, admin=args.admin, workers=args.workers, store=args.store, routes=routes,
        admin_token_file=args.admin_token_file, metrics_auth=args.metrics_auth,
        trusted_proxies=tuple(args.trusted_proxy), access_log=args.access_log,
        access_log_client_ids=args.log_client_ids,
        timeouts=dataclasses.replace(Timeouts(), shutdown_grace=args.shutdown_grace),
        state_dir=args.state_dir,
    )


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the proxy and its admin API", description=__doc__ + """

Restart rule: --routes seeds an empty store; on later starts the file is applied as a new revision only
when its content changed since it was last applied, so live changes made through the admin API survive
restarts.""", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routes", metavar="FILE", help="route file (YAML) to seed or update the store")
    add_serve_options(p)
    p.set_defaults(func=run)

    w = sub.add_parser("_worker")  # internal: one data-plane worker process; hidden from --help below
    w.add_argument("--id", required=True)
    w.add_argument("--settings-json", required=True)
    w.add_argument("--listen-fd", type=int, default=None)
    w.add_argument("--ready-fd", type=int, default=None)
    w.set_defaults(func=run_worker)
    sub._choices_actions = [a for a in sub._choices_actions if a.dest != "_worker"]


def run(args: argparse.Namespace) -> int:
    from proxy.server import run as run_loop
    from proxy.server import run_supervisor

    settings = settings_from_args(args, args.routes)
    try:
        run_loop(run_supervisor(settings))
    except ValidationError:
        print("turnout: the route file is invalid and the store is empty: nothing to serve", file=sys.stderr)
        return 1
    except (OSError, TurnoutError) as e:
        print(f"turnout: {e}", file=sys.stderr)
        return 1
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from proxy.server import run as run_loop
    from proxy.server import run_worker as worker_main
    from proxy.server import settings_from_json

    try:
        run_loop(worker_main(settings_from_json(args.settings_json), args.id, args.listen_fd, args.ready_fd))
    except TurnoutError as e:
        print(f"turnout: {e}", file=sys.stderr)
        return 1
    return 0
