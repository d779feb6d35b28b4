"""Docker versions from the command line: deploy, scale, retire and docker-versions.

Design rule: each talks to a running `turnout serve` through its admin API (/api/v1/docker); the proxy's Docker
provider makes the containers. `deploy` and `scale` wait until the replicas pass their health checks and
are recorded as the version's instances, showing progress; a version that never gets there is reported
with its containers' last log lines and exits 1 (it is registered but has no instances, so it gets no
traffic). Exit status otherwise as for the other operator commands (2 usage, 3 admin API unreachable).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from typing import Any, TextIO

from proxy.commands.client import AdminClient
from proxy.commands.operate import API, UsageError, _common, _entry

D = API + "/docker/versions"
# How often progress is polled; replicas become healthy in seconds, so a quarter second looks live.
POLL_INTERVAL = 0.25
DEFAULT_WAIT = 120.0


def register(sub: Any) -> None:
    p = sub.add_parser("deploy", help="run a version from a container image and wait until it is healthy",
                       description="Register NAME as a docker version of IMAGE (pinned by digest) and wait until "
                       "its replicas pass their health checks. Routing does not change: send traffic to it with "
                       "`turnout split` or `turnout pin`.")
    p.add_argument("name")
    p.add_argument("--image", required=True, metavar="IMAGE",
                   help="repo@sha256:<digest or image ID>; a tag only with --allow-tag (resolved once)")
    p.add_argument("--allow-tag", action="store_true", help="accept a tag and pin the image it names now")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="containers to run (default 1)")
    p.add_argument("--zones", metavar="Z1,Z2,...", help="spread the replicas evenly over these zones (one Docker "
                   "engine each: docker.engines in the static config)")
    p.add_argument("--port", type=int, metavar="P", help="the container's listening port (network bridge)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable (repeatable)")
    p.add_argument("--network", choices=("bridge", "host"), default="bridge",
                   help="bridge: publish --port on 127.0.0.1 (default); host: each replica listens on the "
                   "loopback port given in $PORT")
    p.add_argument("--health-path", default="/", metavar="PATH", help="GET this path to check a replica (default /)")
    p.add_argument("--health-interval", type=float, default=2.0, metavar="SECONDS", help="between checks (default 2)")
    _wait_options(p)
    _common(p, write=True)
    p.set_defaults(func=_entry(cmd_deploy))

    p = sub.add_parser("scale", help="change how many containers a docker version runs",
                       description="Run N replicas of docker version NAME and wait until they are healthy.")
    p.add_argument("name")
    p.add_argument("replicas", type=int, metavar="N")
    p.add_argument("--force", action="store_true",
                   help="scale to 0 even while routes still send the version traffic (their requests fail)")
    _wait_options(p)
    _common(p, write=True)
    p.set_defaults(func=_entry(cmd_scale))

    p = sub.add_parser("retire", help="remove a docker version's containers and unregister it",
                       description="Unregister docker version NAME and remove its containers. Refused while a "
                       "route references it (split, pin, fallback or mirror): move its traffic first.")
    p.add_argument("name")
    _common(p, write=True)
    p.set_defaults(func=_entry(cmd_retire))

    p = sub.add_parser("docker-versions", help="docker versions: image, replicas healthy/desired, routes",
                       description="List the docker versions of a running proxy with their pinned images, "
                       "healthy and desired replicas, and the routes using them.")
    p.add_argument("name", nargs="?", help="show one version's replicas in detail")
    _common(p)
    p.set_defaults(func=_entry(cmd_docker_versions))


def _wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=DEFAULT_WAIT, metavar="SECONDS",
                   help=f"give up waiting for healthy replicas after this long (default {DEFAULT_WAIT:g})")
    p.add_argument("--no-wait", action="store_true", help="return once the change is recorded")


def _env_pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UsageError(f"--env expects KEY=VALUE, got {item!r}")
        out[k] = v
    return out


def cmd_deploy(args: argparse.Namespace, client: AdminClient) -> int:
    body: dict[str, Any] = {"image": args.image, "replicas": args.replicas, "network": args.network}
    if args.allow_tag:
        body["allow_tag"] = True
    if args.port is not None:
        body["port"] = args.port
    if args.zones:
        body["zones"] = [z.strip() for z in args.zones.split(",") if z.strip()]
    env = _env_pairs(args.env)
    if env:
        body["env"] = env
    if args.health_path != "/" or args.health_interval != 2.0:
        body["health"] = {"path": args.health_path, "interval": args.health_interval}
    reply = client.request("PUT", f"{D}/{args.name}", body, reason=args.reason or None, if_match=args.if_match)
    data = reply.data
    if args.json:
        return _json_result(client, args, data)
    what = f"registered {args.name} (revision {data['revision']})" if data["changed"] else \
        f"{args.name} is already registered with this spec"
    tag = f" from {data['tag']}" if data.get("tag") else ""
    print(f"{what}: {data['image']}{tag}")
    if args.no_wait:
        return 0
    return wait_healthy(client, args.name, args.timeout, sys.stdout)


def cmd_scale(args: argparse.Namespace, client: AdminClient) -> int:
    body: dict[str, Any] = {"replicas": args.replicas}
    if args.force:
        body["force"] = True
    reply = client.request("POST", f"{D}/{args.name}/scale", body, reason=args.reason or None, if_match=args.if_match)
    data = reply.data
    if args.json:
        return _json_result(client, args, data)
    print(data["summary"] if data["changed"] else f"{args.name} already runs {args.replicas} replica(s)")
    if args.no_wait:
        return 0
    return wait_healthy(client, args.name, args.timeout, sys.stdout)


def cmd_retire(args: argparse.Namespace, client: AdminClient) -> int:
    data = client.request("DELETE", f"{D}/{args.name}", reason=args.reason or None, if_match=args.if_match).data
    if args.json:
        _print_json(data)
        return 0
    left = data.get("containers_left", 0)
    print(f"retired {args.name} (revision {data['revision']})" + (
        f"; {left} container(s) still being removed" if left else "; its containers are removed"))
    return 0


def cmd_docker_versions(args: argparse.Namespace, client: AdminClient) -> int:
    if args.name:
        data = client.get(f"{D}/{args.name}").data
        if args.json:
            _print_json(data)
            return 0
        _print_engine(data["engine"], sys.stdout)
        _print_detail(data, sys.stdout)
        return 0
    data = client.get(D).data
    if args.json:
        _print_json(data)
        return 0
    _print_engine(data["engine"], sys.stdout)
    if not data["versions"]:
        print(f"no docker versions (revision {data['revision']})")
        return 0
    rows = [("VERSION", "HEALTHY", "IMAGE", "CREATED", "ROUTES")]
    for v in data["versions"]:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(v["created"])) if v["created"] else "-"
        rows.append((v["name"], f"{v['healthy']}/{v['desired']}", v["image"], created,
                     ",".join(v["routes"]) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def _json_result(client: AdminClient, args: argparse.Namespace, data: dict[str, Any]) -> int:
    """--json: the change, then (unless --no-wait) the version's status once it is ready or has failed."""
    code = 0
    if not args.no_wait:
        code = wait_healthy(client, args.name, args.timeout, io.StringIO())
        data = {**data, "status": client.get(f"{D}/{args.name}").data}
    _print_json(data)
    return code


def _print_json(data: Any) -> None:
    import json

    print(json.dumps(data, indent=1))


def _print_engine(engine: dict[str, Any], out: TextIO) -> None:
    if not engine["ok"]:
        print(f"warning: {engine['error']} (instances below are the last known ones)", file=out)


def _print_detail(v: dict[str, Any], out: TextIO) -> None:
    print(f"{v['name']}: {v['healthy']}/{v['desired']} healthy, image {v['image']}, network {v['network']}, "
          f"routes: {', '.join(v['routes']) or '-'}", file=out)
    if v.get("error"):
        print(f"  error: {v['error']}", file=out)
    for r in v["replicas"]:
        where = r["endpoint"] or "-"
        extra = f", exited {r['exits']}x" if r["exits"] else ""
        err = f" ({r['error']})" if r["error"] and r["state"] != "healthy" else ""
        print(f"  replica {r['replica']}: {r['state']:<9} {r['container'] or '-':<12} {where}{extra}{err}", file=out)


def wait_healthy(client: AdminClient, name: str, timeout: float, out: TextIO) -> int:
    """Show "2/3 healthy" until every replica is healthy and recorded, or report why not."""
    deadline = time.monotonic() + timeout
    tty = out.isatty()
    last = ""
    while True:
        v = client.get(f"{D}/{name}").data
        done = v["healthy"] >= v["desired"] and len(v["instances"]) == v["desired"]
        line = f"{name}: {v['healthy']}/{v['desired']} healthy"
        if not v["engine"]["ok"]:
            line += f" (Docker engine: {v['engine']['error']})"
        if line != last:
            if tty:
                out.write("\r\033[K" + line)
                out.flush()
            else:
                print(line, file=out, flush=True)
            last = line
        if done:
            if tty:
                out.write("\n")
            eps = ", ".join(v["instances"]) or "no instances"
            print(f"{name} is ready: {eps}", file=out)
            return 0
        if v["failing"] or v.get("error") or time.monotonic() >= deadline:
            if tty:
                out.write("\n")
            why = "keeps exiting" if v["failing"] else (v.get("error") or f"not healthy after {timeout:g}s")
            print(f"{name} did not get healthy: {why}", file=out)
            _print_detail(v, out)
            logs = client.get(f"{D}/{name}/logs", query={"tail": "20"}).data["containers"]
            for container, lines in logs.items():
                print(f"last log lines of {container}:", file=out)
                for ln in lines or ["(no output)"]:
                    print(f"  | {ln}", file=out)
            print(f"{name} is registered but has no healthy instances, so it receives no traffic; fix the image "
                  f"and deploy it under a new name, or remove it with `turnout retire {name}`", file=out)
            return 1
        time.sleep(POLL_INTERVAL)
