"""`turnout demo`: three local versions (v1, v2, acme) behind the proxy, on embedded defaults.

Starts the demo versions on 127.0.0.1:9101-9103, then `turnout serve` with routes/demo.yaml (sticky 90/10
split between v1 and v2, client "acme" pinned to its own version, fallback v1), the proxy on
127.0.0.1:8080 and the admin API on 127.0.0.1:8081. Design rule: the demo is `turnout serve` with
embedded defaults, nothing of its own; Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
from typing import Any

from proxy.commands.serve import add_serve_options

DEMO_VERSIONS = (("v1", 9101), ("v2", 9102), ("acme", 9103))


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the demo: three local versions behind the proxy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routes", metavar="FILE", default=None,
                   help="route file (default: routes/demo.yaml of this checkout)")
    add_serve_options(p)
    p.set_defaults(func="proxy.commands.running:demo")
