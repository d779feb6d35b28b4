"""One data-plane worker process (`turnout serve --workers N`, N > 1), started by the supervisor.

Design rule: a worker owns no state of its own. It opens the store, installs every revision through its own
Watcher (proxy.control.watcher, the same install path as the supervisor's), serves its slot's listening
socket, and reports over pipes: the supervisor pokes it on stdin at each commit, it answers on `ready_fd`
with `ready`, then `installed N` for each revision it routes with and `health VERSION URL up|down|gone` for
each change of its endpoints' health (what the supervisor's readiness gates read), and it publishes its
statistics into the metrics directory. End of file on stdin means the supervisor is gone: the worker stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping

from proxy.control.watcher import Watcher
from proxy.dataplane.listener import DataPlane, start_dataplane
from proxy.settings import Settings
from proxy.store import Store, open_store
from proxy.supervisor.process import StopSignal, metrics_dir, state_dir, store_url
from proxy.table import RouteTable, TableHolder
from proxy.telemetry.metrics import WorkerPublisher
from proxy.telemetry.stats import Stats

# How often a worker compares its endpoints' health with what it last reported (the checks themselves run
# every few seconds, so this adds little to how late the supervisor learns of a change).
HEALTH_REPORT_INTERVAL = 0.25


def health_lines(before: Mapping[tuple[str, str], bool], now: Mapping[tuple[str, str], bool]) -> list[str]:
    """The report lines that turn `before` into `now`: one short line per endpoint, so each is written whole
    (a pipe write of at most PIPE_BUF bytes is atomic)."""
    lines = [f"health {v} {url} {'up' if up else 'down'}\n" for (v, url), up in now.items()
             if before.get((v, url)) != up]
    lines.extend(f"health {v} {url} gone\n" for (v, url) in before.keys() - now.keys())
    return lines


async def _report_health(dataplane: DataPlane, report: Callable[[str], bool]) -> None:
    sent: dict[tuple[str, str], bool] = {}
    while True:
        now = {(v, url): up for v, eps in dataplane.health_view().items() for url, up in eps.items()}
        for line in health_lines(sent, now):
            if not report(line):
                break  # a full pipe: what was not sent is sent at the next round
            word = line.split()
            if word[3] == "gone":
                sent.pop((word[1], word[2]), None)
            else:
                sent[(word[1], word[2])] = word[3] == "up"
        await asyncio.sleep(HEALTH_REPORT_INTERVAL)


async def _follow_supervisor(store: Store, stop: asyncio.Event) -> None:
    """The supervisor writes each revision it commits to our stdin: look at the store now rather than at the
    next 10 ms poll. End of file means the supervisor is gone (even by SIGKILL): stop serving."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    poke = getattr(store, "poke", None)
    while await reader.readline():
        if poke is not None:
            poke()
    stop.set()


async def run_worker(settings: Settings, worker_id: str, listen_fds: list[int] | None = None,
                     ready_fd: int | None = None) -> None:
    """Serve until SIGTERM (or the supervisor's end), with the slot's listening sockets as `listen_fds` (one
    per listener; SIGHUP reloads the TLS listeners' certificates) and a
    pipe `ready_fd` on which it writes `ready` once it serves, then `installed N` for the revision it serves
    and each one it routes with later (not stdout: that may carry the access log). `ready` stays a line of
    its own: a supervisor of the previous release reads only that line, and it starts the new release's
    workers on SIGHUP."""
    stopper = StopSignal()
    stats = Stats()
    store = open_store(store_url(settings))
    rev = await store.current()
    holder = TableHolder(RouteTable(rev.state, rev.number))
    watcher = Watcher(store, holder, stats)
    socks = [socket.socket(fileno=fd) for fd in listen_fds] if listen_fds else None
    dataplane = await start_dataplane(settings, holder, stats, reuse_port=True, socks=socks,
                                      state_dir=state_dir(settings))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, dataplane.reload_certificates)
    watcher.listeners.append(dataplane.table_changed)
    if ready_fd is not None:
        os.set_blocking(ready_fd, False)

    def report(line: str) -> bool:
        if ready_fd is None:
            return False
        # A full pipe (a supervisor that stopped reading) drops the line rather than stalling the data plane;
        # the supervisor's wait for it is bounded.
        try:
            os.write(ready_fd, line.encode())
        except OSError:
            return False
        return True

    def installed(table: RouteTable) -> None:
        report(f"installed {table.revision}\n")

    watcher.listeners.append(installed)
    watcher.start()
    report(f"ready\ninstalled {holder.table.revision}\n")
    # Health is published too for a supervisor of the previous release (during SIGHUP), which reads it here.
    publisher = WorkerPublisher(stats, metrics_dir(settings), worker_id,
                                extra=lambda: {"health": dataplane.health_view()})
    publisher_task = loop.create_task(publisher.run())
    health_task = loop.create_task(_report_health(dataplane, report))
    link = loop.create_task(_follow_supervisor(store, stopper.event))
    await stopper.wait()
    stopper.close()
    link.cancel()
    health_task.cancel()
    await dataplane.shutdown(settings.timeouts.shutdown_grace)
    await watcher.stop()
    publisher_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await publisher_task
    await store.close()
    if ready_fd is not None:
        os.close(ready_fd)
