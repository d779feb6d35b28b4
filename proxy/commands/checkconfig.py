"""`turnout check --config FILE`: the static configuration file, with its certificate files loaded.

Design rule: the handler of `turnout check` (named as "module:function" by proxy.commands.check), so the ssl
and cryptography imports of proxy.dataplane.certs load only when a check runs; the route file part is
proxy.commands.check's.
"""

from __future__ import annotations

import argparse
import os
import sys

from proxy.commands.check import run as run_routes
from proxy.config import parse_config
from proxy.dataplane.certs import load_listeners
from proxy.errors import ValidationError
from proxy.settings import Settings


def run_config(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        print(f"{path}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        fields = parse_config(text, os.path.dirname(os.path.abspath(path)))
        settings = Settings(**{k: v for k, v in fields.items() if k not in ("limits", "timeouts")})
        tls = load_listeners(settings)
    except ValidationError as e:
        for err in e.errors:
            print(f"{path}: {err}", file=sys.stderr)
        print(f"{path}: {len(e.errors)} error(s)", file=sys.stderr)
        return 1
    n = len(settings.listeners) or 1
    print(f"{path}: OK ({n} listener(s), {sum(t is not None for t in tls)} with TLS)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.config:
        code = run_config(args.config)
        if code or not args.file:
            return code
    elif not args.file:
        print("turnout check: give a route file, --config FILE, or both", file=sys.stderr)
        return 2
    return run_routes(args)
