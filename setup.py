"""Build hook: the data plane's per-request modules are compiled to C extensions with mypyc.

Why: measured on the benchmark route (README, "Cost per request"), compiling these modules takes the Python
request path from ~13 to ~5 us and the whole proxy from ~33 to ~18 us of CPU per request. The modules are
plain typed Python (mypy --strict), so the same files run uncompiled too:

- TURNOUT_PURE_PYTHON=1 skips compilation;
- without a C compiler or Python's headers the build falls back to pure Python with a warning, so
  `pip install` still works anywhere, only slower (`turnout serve` logs which one it runs).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

# Everything a proxied request runs through (and the table it routes with); nothing of the control plane.
HOT_MODULES = [
    "proxy/dataplane/downstream.py",
    "proxy/dataplane/flow.py",
    "proxy/dataplane/handover.py",
    "proxy/dataplane/exchange.py",
    "proxy/dataplane/dispatch.py",
    "proxy/dataplane/upstream.py",
    "proxy/dataplane/pool.py",
    "proxy/dataplane/plane.py",
    "proxy/dataplane/plan.py",
    "proxy/dataplane/headers.py",
    "proxy/dataplane/mirror.py",
    "proxy/dataplane/health.py",
    "proxy/dataplane/listener.py",
    "proxy/dataplane/identity.py",
    "proxy/dataplane/h2stream.py",
    "proxy/dataplane/h2conn.py",
    "proxy/dataplane/h2accept.py",
    "proxy/dataplane/h2upstream.py",
    "proxy/dataplane/h2ustream.py",
    "proxy/dataplane/grpcwire.py",
    "proxy/dataplane/h1response.py",
    "proxy/telemetry/stats.py",
    "proxy/table.py",
    "proxy/actions.py",
    "proxy/dataplane/rewrite.py",
    "proxy/route_index.py",
    "proxy/select.py",
]


def _why_not_compiled() -> str | None:
    if os.environ.get("TURNOUT_PURE_PYTHON") == "1":
        return "TURNOUT_PURE_PYTHON=1"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}); on Debian: apt-get install build-essential"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        return f"no Python headers in {include}; on Debian: apt-get install python3-dev"
    return None


def ext_modules() -> list[object]:
    why = _why_not_compiled()
    if why is not None:
        print(f"turnout: building the data plane as pure Python ({why})", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    # Third-party modules are read as untyped: mypyc checks declared types at run time, and a stub that
    # is stricter than the library (httptools' URL parts are None when absent) would become a TypeError.
    # `pip install` builds in an isolated environment without them anyway. No config file: the strict
    # checks of [tool.mypy] are for `mypy proxy` with every dependency installed; here they would only
    # trip over those untyped modules (no-any-return and the like).
    return list(mypycify(["--config-file=", "--ignore-missing-imports", "--follow-imports=silent", *HOT_MODULES],
                         opt_level="3"))


setup(ext_modules=ext_modules())
