"""`turnout export --format httproute [ROUTE] [--revision N]`: a running proxy's state (or an earlier
revision's) as Kubernetes HTTPRoute documents with turnout annotations, plus turnout/v1 Version documents.

Design rule: reads through the admin API like the other operator commands (proxy.commands.operate's exit
statuses); the conversion is proxy.httproute_export's, loaded only when the command runs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from proxy.commands.client import AdminClient
from proxy.commands.operate import API, UsageError, _common, _entry, _fail
from proxy.httproute_export import ExportError, export_documents


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="write the state as HTTPRoute documents (to move routes to a Gateway)",
                       description=__doc__)
    p.add_argument("route", nargs="?", help="only this route (and the versions it names)")
    p.add_argument("--format", choices=["httproute"], default="httproute", help="output format (default httproute)")
    p.add_argument("--revision", type=int, metavar="N", help="the state as it was at revision N")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")
    _common(p)
    p.set_defaults(func=_entry(cmd_export))


def cmd_export(args: argparse.Namespace, client: AdminClient) -> int:
    if args.revision is not None and args.revision < 0:
        raise UsageError("--revision must be 0 or more")
    path = API + ("/state" if args.revision is None else f"/revisions/{args.revision}")
    stored = client.get(path).data
    try:
        docs = export_documents(stored, args.route)
    except ExportError as e:
        return _fail(args, e, 1)
    text = yaml.safe_dump_all(docs, sort_keys=False, width=120, explicit_start=False)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise UsageError(f"{args.output}: {e.strerror}") from e
    else:
        sys.stdout.write(text)
    return 0
