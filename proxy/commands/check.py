"""`turnout check FILE` / `turnout check --config FILE`: validate a route file or the static configuration
file offline, printing every error with its field path.

Design rule: the same parsers as the proxy (proxy.parse here; proxy.config and proxy.dataplane.certs for the
configuration file, in proxy.commands.checkconfig), so a file that checks is a file that applies."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from proxy.errors import ValidationError
from proxy.parse import parse_yaml


def register(sub: Any) -> None:
    p = sub.add_parser("check", help="validate a route file", description=__doc__)
    p.add_argument("file", nargs="?", help="route file (YAML)")
    p.add_argument("--config", metavar="FILE", help="static configuration file of `turnout serve --config`")
    # Loaded only to run: checking a config file loads its certificates (ssl, cryptography), which the rest
    # of the command line does not need (see proxy/cli.py).
    p.set_defaults(func="proxy.commands.checkconfig:run")


def run(args: argparse.Namespace) -> int:
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        print(f"{args.file}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        state = parse_yaml(text)
    except ValidationError as e:
        for err in e.errors:
            print(f"{args.file}: {err}", file=sys.stderr)
        print(f"{args.file}: {len(e.errors)} error(s); nothing applied", file=sys.stderr)
        return 1
    pins = sum(len(r.pins) for r in state.routes)
    print(f"{args.file}: OK ({len(state.versions)} versions, {len(state.routes)} routes, {pins} pins)")
    return 0
