"""`turnout check FILE` / `turnout check --config FILE`: validate a route file or the static configuration
file offline, printing every error with its field path; `--explain` prints the turnout routes a file (an
HTTPRoute stream, say) becomes.

Design rule: the same parsers as the proxy (proxy.routefile and proxy.parse here; proxy.config and
proxy.dataplane.certs for the configuration file, in proxy.commands.checkconfig), so a file that checks is
a file that applies."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from proxy.errors import FieldError, ValidationError
from proxy.parse import route_to_dict, version_to_dict
from proxy.routefile import load_route_file, translate_text


def register(sub: Any) -> None:
    p = sub.add_parser("check", help="validate a route file", description=__doc__)
    p.add_argument("file", nargs="?", help="route file (YAML; may be a stream with HTTPRoute documents)")
    p.add_argument("--config", metavar="FILE", help="static configuration file of `turnout serve --config`")
    p.add_argument("--explain", action="store_true",
                   help="print the turnout versions and routes the file becomes (each with where it came from)")
    p.add_argument("--json", action="store_true", help="with --explain: print them as JSON")
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
    warnings: list[FieldError] = []
    try:
        state = load_route_file(text, warnings=warnings)
    except ValidationError as e:
        for err in e.errors:
            print(f"{args.file}: {err}", file=sys.stderr)
        print(f"{args.file}: {len(e.errors)} error(s); nothing applied", file=sys.stderr)
        return 1
    for w in warnings:
        print(f"{args.file}: warning: {w}", file=sys.stderr)
    if getattr(args, "explain", False):
        _, translation = translate_text(text)
        origins = translation.origins if translation is not None else []
        routes = [{**({"from": origins[i]} if i < len(origins) else {}), **route_to_dict(r)}
                  for i, r in enumerate(state.routes)]
        versions = {n: version_to_dict(v) for n, v in state.versions.items()}
        if getattr(args, "json", False):
            print(json.dumps({"versions": versions, "routes": routes,
                              "warnings": [{"path": w.path, "message": w.message} for w in warnings]}, indent=2))
        else:
            print(explain_text(versions, routes))
        return 0
    pins = sum(len(r.pins) for r in state.routes)
    print(f"{args.file}: OK ({len(state.versions)} versions, {len(state.routes)} routes, {pins} pins)")
    return 0


def explain_text(versions: dict[str, Any], routes: list[dict[str, Any]]) -> str:
    """A native route file, each route headed by a comment naming the document field it came from."""
    out = [yaml.safe_dump({"versions": versions}, sort_keys=False, width=120).rstrip(), "routes:"]
    for r in routes:
        origin = r.pop("from", None)
        if origin is not None:
            out.append(f"  # from {origin}")
        body = yaml.safe_dump([r], sort_keys=False, width=120).rstrip()
        out.extend("  " + line for line in body.splitlines())
    if not routes:
        out[-1] = "routes: []"
    return "\n".join(out)
