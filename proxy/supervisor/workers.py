"""The worker processes of `turnout serve --workers N` (N > 1): their slots, restarts and rolling restart.

Design rule: the supervisor binds one SO_REUSEPORT listening socket per slot and hands it down (pass_fds):
the socket outlives its worker, so connections the kernel queued on it while a worker is replaced are served
by the next one instead of being reset. A worker that dies is started again in its slot (with a backoff);
SIGHUP replaces the workers one slot at a time (new worker ready first, then the old one is stopped
gracefully), which is how new code is picked up without failing a request. Each worker reports the revision
it routes with over a pipe, so `routed` can hold an admin write's answer until every worker routes with it,
and each change of its endpoints' health, so the readiness gates see what the workers see.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time

from proxy.settings import Settings, listeners_of
from proxy.supervisor.process import listen_socket, listener_option, log, metrics_dir, settings_to_json
from proxy.table import RouteTable
from proxy.telemetry.published import reset_directory, retire_published

WORKER_READY_TIMEOUT = 30.0
# An admin write is answered once every worker reported that it routes with the new revision, or after this
# long: a healthy worker takes about a millisecond (told over its stdin, it reads the revision and compiles
# its table), so only a worker that cannot read the store or compile the revision makes a write wait it out.
WORKER_ROUTED_TIMEOUT = 1.0
# A worker that keeps dying is started again after 0.5 s, then 1, 2, ... up to 10 s.
WORKER_RESTART_BACKOFF = (0.5, 10.0)

Process = asyncio.subprocess.Process


class Workers:
    """The slots (listening sockets) and the worker process serving each."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.current: list[Process] = []  # the current worker of each slot
        self.retiring: set[Process] = set()  # replaced, stopping gracefully
        self.restarts = 0  # workers started again after they died
        self._slots: list[list[socket.socket]] = []  # per slot, one socket per listener
        self._generation: list[int] = []
        self._keepers: list[asyncio.Task[None]] = []
        self._restarting: asyncio.Task[None] | None = None
        self._ready_pipes: dict[Process, int] = {}
        # The revision each running worker last reported it routes with (from ready to exit), and an event
        # set (then replaced) at every report.
        self._installed: dict[Process, int] = {}
        self._reported = asyncio.Event()
        # What each running worker last reported of its endpoints' health: version -> endpoint -> up.
        self._health: dict[Process, dict[str, dict[str, bool]]] = {}
        self._report_tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._served = 0  # the revision the supervisor serves, told to a worker that just started

    def __repr__(self) -> str:
        return f"<Workers [slots: {len(self._slots)} | restarts: {self.restarts}]>"

    def bind(self) -> None:
        s = self.settings
        # SO_REUSEPORT lets any process of this user join a port, so a second proxy started on it would
        # silently take a share of the connections. A socket without SO_REUSEPORT binds only where nothing
        # listens: binding one first is the check. It is the kernel's own rule, so it also catches other
        # programs and overlapping addresses (0.0.0.0 against 127.0.0.1), which a lock file keyed by the
        # address would miss; what it leaves is two proxies starting within the same few microseconds.
        addresses = [(li.address, listener_option(s, i)) for i, li in enumerate(listeners_of(s))]
        for address, option in addresses:
            listen_socket(address, option, listen=False).close()
        for _ in range(s.workers):
            # Not inheritable (uvloop's spawn does not close other descriptors): each worker gets only its
            # own slot's sockets through pass_fds, so a socket is gone once that worker closes it.
            self._slots.append([listen_socket(a, o, reuse_port=True) for a, o in addresses])
            self._generation.append(0)

    async def spawn(self) -> None:
        reset_directory(metrics_dir(self.settings))
        started = [await self._start_worker(i) for i in range(len(self._slots))]
        for i, proc in enumerate(started):
            if not await self._ready(proc):
                raise OSError(f"worker {i} did not start (exit code {proc.returncode})")
        self.current = started
        loop = asyncio.get_running_loop()
        self._keepers = [loop.create_task(self._keep(i)) for i in range(len(self._slots))]

    def stopping(self) -> bool:
        return self._stopping

    def _worker_id(self, slot: int) -> str:
        g = self._generation[slot]
        return str(slot) if g == 0 else f"{slot}-{g}"

    async def _start_worker(self, slot: int) -> Process:
        fds = [sock.fileno() for sock in self._slots[slot]]
        ready_r, ready_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "_worker", "--id", self._worker_id(slot),
                *(a for fd in fds for a in ("--listen-fd", str(fd))),
                "--ready-fd", str(ready_w), "--settings-json", settings_to_json(self.settings),
                stdin=asyncio.subprocess.PIPE, pass_fds=(*fds, ready_w))
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)  # the child has its copy; EOF on ready_r then means the child is gone
        self._ready_pipes[proc] = ready_r
        return proc

    async def _ready(self, proc: Process) -> bool:
        """True once the worker wrote `ready` (it serves); False if it exited or took too long. Its later
        reports are read by _follow_reports."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(self._ready_pipes.pop(proc), "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            async with asyncio.timeout(WORKER_READY_TIMEOUT):
                line = await reader.readline()
        except TimeoutError:
            line = b""
        except BaseException:  # cancelled by stop()
            transport.close()
            raise
        if line.strip() == b"ready":
            self._installed[proc] = 0  # until its first `installed N`, which follows at once
            task = loop.create_task(self._follow_reports(proc, reader, transport))
            self._report_tasks.add(task)
            task.add_done_callback(self._report_tasks.discard)
            return True
        transport.close()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return False

    async def _follow_reports(self, proc: Process, reader: asyncio.StreamReader,
                              transport: asyncio.BaseTransport) -> None:
        try:
            while line := await reader.readline():
                word = line.split()
                if len(word) == 2 and word[0] == b"installed" and word[1].isdigit():
                    self._installed[proc] = max(self._installed.get(proc, 0), int(word[1]))
                    self._report()
                elif len(word) == 4 and word[0] == b"health":
                    self._health_report(proc, word[1].decode(), word[2].decode(), word[3])
        finally:
            # End of file: the worker is gone, so no write waits for it and its view of health is void.
            transport.close()
            self._installed.pop(proc, None)
            self._health.pop(proc, None)
            self._report()

    def _health_report(self, proc: Process, version: str, endpoint: str, word: bytes) -> None:
        view = self._health.setdefault(proc, {})
        if word == b"gone":
            eps = view.get(version)
            if eps is not None:
                eps.pop(endpoint, None)
                if not eps:
                    del view[version]
        else:
            view.setdefault(version, {})[endpoint] = word == b"up"

    def _report(self) -> None:
        self._reported.set()
        self._reported = asyncio.Event()

    async def routed(self, revision: int) -> None:
        """Return once every running worker (retiring ones too) routes with `revision`, or after
        WORKER_ROUTED_TIMEOUT: an admin write is answered then, so any request sent after the answer is routed
        by the write, whichever worker takes it."""
        try:
            async with asyncio.timeout(WORKER_ROUTED_TIMEOUT):
                while any(n < revision for n in self._installed.values()):
                    await self._reported.wait()
        except TimeoutError:
            behind = ", ".join(f"pid {p.pid} at revision {n}" for p, n in self._installed.items() if n < revision)
            log(f"revision {revision} acknowledged before every worker routes with it ({behind})")

    async def _keep(self, slot: int) -> None:
        """Start the slot's worker again when it dies (not when it was replaced or the proxy stops)."""
        delay = WORKER_RESTART_BACKOFF[0]
        while True:
            proc = self.current[slot]
            started = time.monotonic()
            code = await proc.wait()
            if self._stopping:
                return
            if proc is not self.current[slot]:
                continue  # replaced by a rolling restart; watch the new one
            if time.monotonic() - started > 10 * WORKER_RESTART_BACKOFF[1]:
                delay = WORKER_RESTART_BACKOFF[0]  # a worker that ran a while is not a crash loop
            log(f"worker {self._worker_id(slot)} exited with code {code}; starting it again in {delay:g}s "
                "(connections queued on its socket wait for it)")
            retire_published(metrics_dir(self.settings), self._worker_id(slot))
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, WORKER_RESTART_BACKOFF[1])
                if self.stopping():  # set by stop() while this task slept (a call: mypy narrows the field)
                    return
                new, ok = await self._next_worker(slot)
                if ok:
                    self.restarts += 1
                    break
                log(f"worker {self._worker_id(slot)} did not start (exit code {new.returncode}); "
                    f"trying again in {delay:g}s")

    async def _next_worker(self, slot: int) -> tuple[Process, bool]:
        """Start the slot's next worker and, once it serves, make it the slot's current one (and tell it the
        revision being served). -> (the process, whether it serves)."""
        self._generation[slot] += 1
        new = await self._start_worker(slot)
        if not await self._ready(new):
            return new, False
        self.current[slot] = new
        self._tell_one(new, self._served)
        return new, True

    def restart(self) -> None:
        """SIGHUP: replace every worker, one slot at a time (a second SIGHUP meanwhile is ignored)."""
        if self._stopping or (self._restarting is not None and not self._restarting.done()):
            log("rolling restart already in progress")
            return
        self._restarting = asyncio.get_running_loop().create_task(self._rolling_restart())

    async def _rolling_restart(self) -> None:
        n = len(self.current)
        log(f"rolling restart of {n} worker(s)")
        for slot in range(n):
            if self._stopping:
                return
            old, old_id = self.current[slot], self._worker_id(slot)
            new, ok = await self._next_worker(slot)
            if not ok:
                log(f"rolling restart stopped: a new worker for slot {slot} did not start (exit code "
                    f"{new.returncode}); the running workers keep serving")
                return
            # The new worker accepts from the same socket; the old one stops accepting, answers what it has
            # in flight with `Connection: close`, and exits.
            self.retiring.add(old)
            with contextlib.suppress(ProcessLookupError):
                old.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(old.wait(), self.settings.timeouts.shutdown_grace + 5)
            except TimeoutError:
                old.kill()
                await old.wait()
            self.retiring.discard(old)
            retire_published(metrics_dir(self.settings), old_id)
            log(f"rolling restart: slot {slot} replaced ({slot + 1}/{n})")
        log("rolling restart done")

    @staticmethod
    def _tell_one(proc: Process, revision: int) -> None:
        # Also sent to a worker that just started: it may have read the store just before this revision.
        if proc.stdin is not None and proc.returncode is None:
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.write(f"{revision}\n".encode())

    def table_changed(self, table: RouteTable) -> None:
        """A watcher listener: poke every worker to read the new revision now."""
        self._served = table.revision
        for proc in self.current:
            self._tell_one(proc, table.revision)

    def health_view(self) -> dict[str, dict[str, bool]]:
        """Endpoint health as the workers reported it: up if any worker sees it up."""
        merged: dict[str, dict[str, bool]] = {}
        for view in self._health.values():
            for v, eps in view.items():
                into = merged.setdefault(v, {})
                for ep, up in eps.items():
                    into[ep] = into.get(ep, False) or up
        return merged

    async def stop_restarts(self) -> None:
        """No worker is started again from now on (the proxy is stopping)."""
        self._stopping = True
        for t in self._keepers:
            t.cancel()
        if self._restarting is not None:
            self._restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarting

    async def stop(self) -> None:
        """Graceful stop of every worker: close the supervisor's copies of the sockets, SIGTERM, wait."""
        await self.stop_restarts()
        grace = self.settings.timeouts.shutdown_grace
        # Closed before the workers are told to stop: each closes its copy as its graceful stop begins, so the
        # socket is gone then and a new connection is refused at once, instead of waiting where no one accepts.
        for socks in self._slots:
            for sock in socks:
                sock.close()
        procs = [*self.current, *self.retiring]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), grace + 5)
            except TimeoutError:
                proc.kill()
        for task in list(self._report_tasks):
            task.cancel()
        await asyncio.gather(*self._report_tasks, return_exceptions=True)
