"""The floor of this architecture: the least a Python proxy on uvloop can do per request (#17).

    .venv/bin/python -m benchmarks.profile.floor --listen PORT --upstream PORT [--parse] [--buffered]

Not a proxy anyone should run: each accepted connection gets one upstream connection of its own, opened
before the first request, and bytes are passed through unchanged in both directions (no routing, no header
rewriting, no limits, no timeouts, no metrics). What it costs per request is what uvloop, the Python
callbacks and the system calls cost, so it bounds from below what turnout (or any asyncio.Protocol proxy)
can reach on this machine:
- plain: one data_received and one write per direction per request;
- `--parse`: the same, with httptools (llhttp) parsing both directions as turnout does (callbacks
  for the URL, each header, and completion; the bytes forwarded are still the client's and the upstream's);
- `--buffered`: asyncio.BufferedProtocol (uvloop's get_buffer/buffer_updated) instead of data_received:
  every read lands in one buffer shared by all connections, the parser reads it through a memoryview, and
  the write passes the memoryview itself. uvloop writes at once when the socket takes it all; when it does
  not, it keeps a reference to what is left, so the relay then gives the shared buffer up to that write and
  takes a new one (zero copies in the common case, never a corrupted byte).
benchmarks.profile.instructions and benchmarks.gap run it beside turnout and HAProxy.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import httptools
import uvloop


class _Parsed:
    """httptools callbacks that do what a proxy's must at least do: look at every header."""

    def __init__(self) -> None:
        self.headers = 0
        self.done = 0

    def on_url(self, url: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += 1

    def on_message_complete(self) -> None:
        self.done += 1


BUF = 65536
# The relay's variants as the benchmarks name their targets.
VARIANTS = ("floor", "floor-parse", "floor-buffered", "floor-parse-buffered")


def command(variant: str, listen: int, upstream: int) -> list[str]:
    """The command line that runs `variant` (one of VARIANTS) on `listen`, relaying to `upstream`."""
    argv = [sys.executable, "-m", "benchmarks.profile.floor", "--listen", str(listen), "--upstream", str(upstream)]
    if "parse" in variant:
        argv.append("--parse")
    if "buffered" in variant:
        argv.append("--buffered")
    return argv


class _Relay:
    """One side of a connection pair; not itself a protocol class, because uvloop reads into get_buffer only
    for protocols that are not asyncio.Protocol."""

    def __init__(self, parse: bool, response: bool) -> None:
        self.peer: _Relay | None = None
        self.transport: Any = None
        self.pending: list[bytes] = []
        self.cb = _Parsed()
        self.parser: Any = None
        if parse:
            self.parser = (httptools.HttpResponseParser(self.cb) if response
                           else httptools.HttpRequestParser(self.cb))

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()


class Side(_Relay, asyncio.Protocol):
    def forward(self, data: bytes) -> None:
        if self.parser is not None:
            self.parser.feed_data(data)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def data_received(self, data: bytes) -> None:
        self.forward(data)


class Shared:
    """The read buffer every buffered connection reads into (the loop runs one callback at a time)."""

    def __init__(self) -> None:
        self.buf = bytearray(BUF)
        self.view = memoryview(self.buf)

    def renew(self) -> None:
        self.buf = bytearray(BUF)
        self.view = memoryview(self.buf)


SHARED = Shared()


class BufferedSide(_Relay, asyncio.BufferedProtocol):
    def get_buffer(self, sizehint: int) -> memoryview:
        return SHARED.view

    def buffer_updated(self, nbytes: int) -> None:
        data = SHARED.view[:nbytes]
        if self.parser is not None:
            self.parser.feed_data(data)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            t = peer.transport
            t.write(data)
            if t.get_write_buffer_size():
                SHARED.renew()  # the transport holds `data` until it is sent
        else:
            self.pending.append(bytes(data))


async def serve(listen: int, upstream: int, parse: bool, buffered: bool) -> None:
    loop = asyncio.get_running_loop()
    cls: Any = BufferedSide if buffered else Side
    dials: set[asyncio.Task[None]] = set()  # referenced until done, or the loop may collect them

    def accepted() -> Any:
        client = cls(parse, response=False)

        async def dial() -> None:
            try:
                _, up = await loop.create_connection(lambda: cls(parse, response=True), "127.0.0.1", upstream)
            except OSError:
                if client.transport is not None:
                    client.transport.close()
                return
            up.peer, client.peer = client, up
            for chunk in client.pending:
                up.transport.write(chunk)
            client.pending.clear()

        task = loop.create_task(dial())
        dials.add(task)
        task.add_done_callback(dials.discard)
        return client

    server = await loop.create_server(accepted, "127.0.0.1", listen, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--upstream", type=int, required=True)
    ap.add_argument("--parse", action="store_true")
    ap.add_argument("--buffered", action="store_true")
    args = ap.parse_args()
    uvloop.run(serve(args.listen, args.upstream, args.parse, args.buffered))


if __name__ == "__main__":
    main()
