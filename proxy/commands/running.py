"""The commands that start a proxy: `turnout serve`, its internal `_worker`, and `turnout demo`.

Design rule: this is the one command module that imports the supervisor (and through it aiohttp, uvloop and
the data plane), so the CLI names these handlers by "module:function" (see proxy/cli.py) and imports this
module only when one of them runs. Every other command line (`turnout --help`, `turnout status`) stays
fast: 0.13 s instead of 0.58 s to start, measured best of 7.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from proxy.commands.demo import DEMO_VERSIONS
from proxy.commands.serve import settings_from_args
from proxy.dataplane.certs import load_listeners
from proxy.errors import TurnoutError, ValidationError
from proxy.supervisor.main import run as run_loop
from proxy.supervisor.main import run_supervisor
from proxy.supervisor.process import settings_from_json
from proxy.supervisor.worker import run_worker as worker_main


def serve(args: argparse.Namespace) -> int:

    settings = settings_from_args(args, args.routes)
    try:
        load_listeners(settings)  # an unreadable certificate is one line before anything starts
    except ValidationError as e:
        for err in e.errors:
            print(f"turnout: {err}", file=sys.stderr)
        return 1
    try:
        run_loop(run_supervisor(settings))
    except ValidationError:
        print("turnout: the route file is invalid and the store is empty: nothing to serve", file=sys.stderr)
        return 1
    except (OSError, TurnoutError) as e:
        print(f"turnout: {e}", file=sys.stderr)
        return 1
    return 0


def worker(args: argparse.Namespace) -> int:

    try:
        run_loop(worker_main(settings_from_json(args.settings_json), args.id, args.listen_fd, args.ready_fd))
    except TurnoutError as e:
        print(f"turnout: {e}", file=sys.stderr)
        return 1
    return 0


def _demo_routes() -> str:
    for candidate in (Path.cwd() / "routes" / "demo.yaml", Path(__file__).resolve().parents[2] / "routes" / "demo.yaml",
                      Path("/etc/turnout/routes/demo.yaml")):
        if candidate.is_file():
            return str(candidate)
    raise SystemExit("turnout demo: routes/demo.yaml not found; pass --routes FILE")


def _wait_http(url: str, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def demo(args: argparse.Namespace) -> int:
    routes = args.routes or _demo_routes()
    if args.state_dir is None:
        # The demo keeps its own state so it never mixes with a real `turnout serve` on this machine.
        args.state_dir = str(Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
                             / "turnout" / "demo")
    if args.store is None:
        args.store = f"sqlite://{args.state_dir}/state.db"
    settings = settings_from_args(args, routes)
    children: list[subprocess.Popen[bytes]] = []
    try:
        for name, port in DEMO_VERSIONS:
            children.append(subprocess.Popen(
                [sys.executable, "-m", "proxy.commands.demo_backend", "--name", name, "--port", str(port)]))
        deadline = time.monotonic() + 15
        for name, port in DEMO_VERSIONS:
            if not _wait_http(f"http://127.0.0.1:{port}/", deadline):
                print(f"turnout demo: version {name} did not start on 127.0.0.1:{port}", file=sys.stderr)
                return 1
        proxy_url = f"http://{settings.listen[0]}:{settings.listen[1]}"
        admin_url = f"http://{settings.admin[0]}:{settings.admin[1]}"
        token_file = Path(settings.state_dir or ".") / "admin-token"
        # The demo usually runs from ./dev, whose venv is not on PATH: print the command that works here.
        exe = Path(sys.executable).parent / "turnout"
        cli = str(exe) if exe.exists() else f"{sys.executable} -m proxy"
        print(f"""
turnout demo: versions v1, v2 and acme are up; the proxy starts on {proxy_url}

Try:
  curl -s {proxy_url}/                                  # weighted pick, no client id
  curl -s -H 'X-Client-Id: alice' {proxy_url}/           # sticky: alice always gets the same version
  curl -s -H 'X-Client-Id: acme' {proxy_url}/            # acme is pinned to its dedicated version
  export TURNOUT_ADMIN_TOKEN=$(cat {token_file})
  {cli} status --admin {admin_url}
  {cli} split web v1=50 v2=50 --reason 'canary looks good' --admin {admin_url}
  {cli} history --admin {admin_url}
  {cli} rollback web --admin {admin_url}
Live status page: {admin_url}/ui (token in {token_file})
Ctrl-C stops everything.
""", flush=True)

        run_loop(run_supervisor(settings))
        return 0
    except KeyboardInterrupt:
        return 0
    except (OSError, TurnoutError) as e:
        print(f"turnout: {e}", file=sys.stderr)
        return 1
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
