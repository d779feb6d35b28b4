"""What every process of `turnout serve` shares: where its state lives, how it logs, binds and stops.

Design rule: plain functions of the settings, no state of their own, so the supervisor, its worker
processes and the data plane (the access log's directory) read the same paths without importing each other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from proxy.settings import Certificate, Limits, Listener, Settings, Timeouts, TlsConfig
from proxy.store.sqlite import default_path

LISTEN_BACKLOG = 1024


def state_dir(settings: Settings) -> Path:
    if settings.state_dir:
        return Path(settings.state_dir)
    return default_path().parent


def store_url(settings: Settings) -> str:
    """--store, else the SQLite file in the state dir: two proxies with different state dirs never share
    a store by accident."""
    if settings.store and settings.store != "sqlite://":
        return settings.store
    return f"sqlite://{(state_dir(settings) / 'state.db').absolute()}"


def metrics_dir(settings: Settings) -> Path:
    return state_dir(settings) / "run" / f"metrics-{settings.listen[1]}"


def log(msg: str) -> None:
    print(f"turnout: {msg}", file=sys.stderr, flush=True)


def hostport(hp: tuple[str, int]) -> str:
    return f"[{hp[0]}]:{hp[1]}" if ":" in hp[0] else f"{hp[0]}:{hp[1]}"


def listener_option(settings: Settings, index: int) -> str:
    """Where listener `index` came from, for error messages: --listen or the config file's entry."""
    return f"listeners[{index}]" if settings.listeners else "--listen"


def listen_socket(address: tuple[str, int], option: str, *, reuse_port: bool = False,
                  listen: bool = True) -> socket.socket:
    """A TCP socket bound to `address` (and listening), or an OSError whose message names the address and the
    option it came from."""
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    try:
        # Connections of an earlier run still in TIME_WAIT on this port must not keep a restart from binding
        # (without it, any change between one and several workers fails until they expire).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if listen:
            sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {hostport(address)} ({option}): {e.strerror or e}") from e
    return sock


def settings_to_json(settings: Settings) -> str:
    return json.dumps(dataclasses.asdict(settings))


def settings_from_json(text: str) -> Settings:
    d: dict[str, Any] = json.loads(text)
    d["listen"] = tuple(d["listen"])
    d["admin"] = tuple(d["admin"])
    d["trusted_proxies"] = tuple(d["trusted_proxies"])
    d["limits"] = Limits(**d["limits"])
    d["timeouts"] = Timeouts(**d["timeouts"])
    d["listeners"] = tuple(_listener(li) for li in d.get("listeners", ()))
    d["docker_engines"] = tuple((z, url) for z, url in d.get("docker_engines", ()))
    if "grpc_error_codes" in d:
        d["grpc_error_codes"] = tuple(d["grpc_error_codes"])
    return Settings(**d)


def _listener(d: dict[str, Any]) -> Listener:
    tls = d["tls"]
    if tls is not None:
        tls = TlsConfig(**{**tls, "certificates": tuple(Certificate(**c) for c in tls["certificates"])})
    return Listener(name=d["name"], address=tuple(d["address"]), tls=tls,
                    protocols=tuple(d["protocols"]))


class StopSignal:
    """SIGTERM/SIGINT set an event from the moment this is created, so a signal that arrives while the
    process is still starting is a graceful stop, not the default instant death."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self.event.set)

    async def wait(self) -> None:
        await self.event.wait()

    def close(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.remove_signal_handler(sig)
