"""The `turnout` command line. Each command group lives in proxy/commands/<group>.py with a
`register(subparsers)` that adds its commands; each command's handler returns the exit status.

Design rule: the command line starts fast: modules registered here import only what parsing options and
talking to the admin API need. A command that starts a proxy names its handler as "module:function"
(proxy/commands/running.py), imported only when that command runs: the supervisor and the data plane are
never loaded for `turnout --help` or `turnout status`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

from proxy import __version__, data_plane_build
from proxy.commands.client import USAGE_PROBLEM

# Command modules, in the order their commands appear in --help.
COMMAND_MODULES = (
    "proxy.commands.serve",
    "proxy.commands.demo",
    "proxy.commands.check",
    "proxy.commands.operate",
    "proxy.commands.compare",
    "proxy.commands.export",
    "proxy.commands.deploy",
    "proxy.commands.release",
)


class _Parser(argparse.ArgumentParser):
    """Under --json a command line the parser refuses is a problem document on stdout too, like every other
    failure of an operator command; subcommand parsers are of this class as well (argparse makes them so)."""

    json_errors = False  # set by main() for one command line

    def error(self, message: str) -> NoReturn:
        if not _Parser.json_errors:
            super().error(message)
        kind, title = USAGE_PROBLEM
        print(json.dumps({"type": kind, "title": title, "detail": f"{self.prog}: {message}", "errors": []},
                         indent=2))
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="turnout",
        description="Route HTTP traffic between immutable versions of a service: weighted canaries, "
        "dedicated versions for large clients, sticky assignment and instant fallback.",
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    # argparse lists the choices of an unknown command by iterating them; internal ones (`_worker`) stay
    # parseable but unlisted. The action still finds every parser through its own name map.
    sub.choices = _PublicChoices(sub.choices)
    return parser


class _PublicChoices(dict[str, _Parser]):
    def __iter__(self) -> Iterator[str]:
        return (name for name in super().__iter__() if not name.startswith("_"))


class _Version(argparse.Action):
    # Not argparse's "version" action: its string is built for every command, and finding out how the
    # data plane was built imports it, which operator commands do not need.
    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        print(f"turnout {__version__} (data plane: {data_plane_build()})")
        parser.exit()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    _Parser.json_errors = "--json" in (sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    func = args.func
    if isinstance(func, str):  # "module:function": a handler whose module is loaded only to run it
        module, _, name = func.partition(":")
        func = getattr(importlib.import_module(module), name)
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
