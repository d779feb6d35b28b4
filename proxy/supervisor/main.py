"""`turnout serve`: one supervisor process wiring store, route table, data plane, admin API and providers.

Process model:
- workers == 1: the data plane runs in the supervisor's own event loop, so an admin write installs the
  new table in the same process right after the commit (rollback in a few milliseconds).
- workers > 1: the supervisor runs the admin API, providers and controllers; N worker processes open the
  store and follow it with `watch` (SQLite polls every 10 ms, etcd pushes), and publish their statistics
  for the supervisor's /metrics. An admin write is answered once every worker reports that it routes with
  the new revision (at most WORKER_ROUTED_TIMEOUT later). The supervisor binds one SO_REUSEPORT listening
  socket per worker slot and hands it down (pass_fds): the socket outlives its worker, so connections the
  kernel queued on it while a worker is replaced are served by the next one instead of being reset. A
  worker that dies is started again in its slot; SIGHUP replaces the workers one slot at a time (new
  worker ready first, then the old one drains), which is how new code is picked up without failing a
  request. On SIGTERM the supervisor closes its copies of the sockets first, so the port refuses new
  connections as soon as the workers start draining.

Restart rule for `--routes FILE`: the file seeds an empty store; later it is applied as a new revision
only when its content changed since it was last applied, so a restart never undoes live changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.changes import apply_document
from proxy.control import gates
from proxy.errors import ConflictError, ValidationError
from proxy.model import State
from proxy.parse import parse_yaml
from proxy.settings import Limits, Settings, Timeouts
from proxy.store import Revision, Store, open_store
from proxy.table import RouteTable, TableHolder
from proxy.telemetry.stats import Stats

ROUTES_FILE_META = "routes_file.sha256"
WORKER_BACKLOG = 1024
WORKER_READY_TIMEOUT = 30.0
# An admin write is answered once every worker reported that it routes with the new revision, or after this
# long: a healthy worker takes about a millisecond (told over its stdin, it reads the revision and compiles
# its table), so only a worker that cannot read the store or compile the revision makes a write wait it out.
WORKER_ROUTED_TIMEOUT = 1.0
# A worker that keeps dying is started again after 0.5 s, then 1, 2, ... up to 10 s.
WORKER_RESTART_BACKOFF = (0.5, 10.0)


def state_dir(settings: Settings) -> Path:
    if settings.state_dir:
        return Path(settings.state_dir)
    from proxy.store.sqlite import default_path

    return default_path().parent


def store_url(settings: Settings) -> str:
    """--store, else the SQLite file in the state dir: two proxies with different state dirs never share
    a store by accident."""
    if settings.store and settings.store != "sqlite://":
        return settings.store
    return f"sqlite://{(state_dir(settings) / 'state.db').absolute()}"


def log(msg: str) -> None:
    print(f"turnout: {msg}", file=sys.stderr, flush=True)


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
            sock.listen(WORKER_BACKLOG)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {_hostport(address)} ({option}): {e.strerror or e}") from e
    return sock


async def seed_from_file(store: Store, path: str, stats: Stats | None = None) -> Revision:
    """Apply the route file per the restart rule; an invalid file leaves the stored state serving."""
    text = Path(path).read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode()).hexdigest()
    current = await store.current()
    if current.number > 0 and await store.get_meta(ROUTES_FILE_META) == digest:
        log(f"{path} unchanged since it was last applied; serving revision {current.number}")
        return current

    def change(state: State) -> tuple[State, str]:
        return apply_document(state, parse_yaml(text, now=time.time(), current=state))

    try:
        # Gated like `turnout apply`: a version whose check command fails gets no traffic from the file either.
        rev = await gates.gated_update(store, change, actor=f"file:{os.path.basename(path)}",
                                       reason="seed from route file" if current.number == 0 else "route file changed")
    except (ValidationError, ConflictError) as e:
        for err in e.errors if isinstance(e, ValidationError) else (e,):
            log(f"{path}: {err}")
        if stats is not None:
            stats.apply_errors += 1
        # A check refused at the first start wrote its verdict, a revision of the empty state: nothing to serve.
        if current.number == 0 or current.state == State():
            raise
        log(f"{path} refused; still serving revision {current.number}")
        return current
    await store.set_meta(ROUTES_FILE_META, digest)
    if rev.number != current.number:
        log(f"applied {path} as revision {rev.number}: {rev.info.summary}")
    return rev


class Follower:
    """Installs every new revision into the table holder and tells listeners (the data plane)."""

    def __init__(self, store: Store, holder: TableHolder, stats: Stats) -> None:
        self.store = store
        self.holder = holder
        self.stats = stats
        self.listeners: list[Callable[[RouteTable], None]] = []
        self._task: asyncio.Task[None] | None = None

    def install(self, rev: Revision) -> None:
        if rev.number <= self.holder.table.revision and self.holder.table.revision != 0:
            return
        try:
            table = RouteTable(rev.state, rev.number, previous=self.holder.table)
        except Exception as e:  # a table that cannot compile must never take the old one down
            self.stats.apply_errors += 1
            log(f"revision {rev.number} could not be compiled, still serving {self.holder.table.revision}: {e}")
            return
        self.on_table(table)

    def on_table(self, table: RouteTable) -> None:
        if self.holder.offer(table):
            self.stats.applied += 1
            for listener in self.listeners:
                listener(table)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                async for rev in self.store.watch(self.holder.table.revision):
                    self.install(rev)
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log(f"store watch failed ({e}); serving revision {self.holder.table.revision}, retrying")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def settings_to_json(settings: Settings) -> str:
    return json.dumps(dataclasses.asdict(settings))


def settings_from_json(text: str) -> Settings:
    d: dict[str, Any] = json.loads(text)
    d["listen"] = tuple(d["listen"])
    d["admin"] = tuple(d["admin"])
    d["trusted_proxies"] = tuple(d["trusted_proxies"])
    d["limits"] = Limits(**d["limits"])
    d["timeouts"] = Timeouts(**d["timeouts"])
    return Settings(**d)


def metrics_dir(settings: Settings) -> Path:
    return state_dir(settings) / "run" / f"metrics-{settings.listen[1]}"


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


async def run_worker(settings: Settings, worker_id: str, listen_fd: int | None = None,
                     ready_fd: int | None = None) -> None:
    """One data-plane worker process (workers > 1), started by the supervisor with a pipe on stdin, its
    slot's listening socket as `listen_fd`, and a pipe `ready_fd` on which it writes `ready` once it serves,
    then `installed N` for the revision it serves and each one it routes with later (not stdout: that may
    carry the access log). `ready` stays a line of its own: a supervisor of the previous release reads only
    that line, and it starts the new release's workers on SIGHUP."""
    from proxy.dataplane.listener import start_dataplane

    stopper = StopSignal()
    stats = Stats()
    store = open_store(store_url(settings))
    rev = await store.current()
    holder = TableHolder(RouteTable(rev.state, rev.number))
    follower = Follower(store, holder, stats)
    sock = socket.socket(fileno=listen_fd) if listen_fd is not None else None
    dataplane = await start_dataplane(settings, holder, stats, reuse_port=True, sock=sock,
                                     state_dir=state_dir(settings))
    follower.listeners.append(dataplane.table_changed)
    if ready_fd is not None:
        os.set_blocking(ready_fd, False)

    def report(line: str) -> None:
        if ready_fd is not None:
            # A full pipe (a supervisor that stopped reading) drops the line rather than stalling the data
            # plane; the supervisor's wait for it is bounded.
            with contextlib.suppress(OSError):
                os.write(ready_fd, line.encode())

    follower.listeners.append(lambda table: report(f"installed {table.revision}\n"))
    follower.start()
    report(f"ready\ninstalled {holder.table.revision}\n")
    publisher_task = None
    try:
        from proxy.telemetry.metrics import WorkerPublisher

        publisher = WorkerPublisher(stats, metrics_dir(settings), worker_id,
                                    extra=lambda: {"health": dataplane.health_view()})
        publisher_task = asyncio.get_running_loop().create_task(publisher.run())
    except ImportError:
        pass
    link = asyncio.get_running_loop().create_task(_follow_supervisor(store, stopper.event))
    await stopper.wait()
    stopper.close()
    link.cancel()
    await dataplane.shutdown(settings.timeouts.shutdown_grace)
    await follower.stop()
    if publisher_task is not None:
        publisher_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher_task
    await store.close()
    if ready_fd is not None:
        os.close(ready_fd)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = Stats()
        self.store = open_store(store_url(settings))
        self.holder = TableHolder()
        self.follower = Follower(self.store, self.holder, self.stats)
        self.dataplane: Any = None
        self.workers: list[asyncio.subprocess.Process] = []  # the current worker of each slot
        self.retiring: set[asyncio.subprocess.Process] = set()  # replaced, draining
        self._slots: list[socket.socket] = []
        self._generation: list[int] = []
        self._keepers: list[asyncio.Task[None]] = []
        self._restarting: asyncio.Task[None] | None = None
        self._ready_pipes: dict[asyncio.subprocess.Process, int] = {}
        # The revision each running worker last reported it routes with (from ready to exit), and an event
        # set (then replaced) at every report.
        self._installed: dict[asyncio.subprocess.Process, int] = {}
        self._reported = asyncio.Event()
        self._report_tasks: set[asyncio.Task[None]] = set()
        self._listener: socket.socket | None = None  # the data plane's, with one worker
        self._admin_sock: socket.socket | None = None
        self._stopping = False
        self.restarts = 0  # workers started again after they died
        self.admin_runner: Any = None
        self.services: list[Any] = []  # objects with async start()/stop(): providers, controllers
        self.ctx: Any = None

    async def start(self) -> None:
        s = self.settings
        # Every port is bound before the route file is committed: a proxy that cannot listen exits without
        # having changed the store.
        self._bind()
        if s.routes:
            rev = await seed_from_file(self.store, s.routes, self.stats)
        else:
            rev = await self.store.current()
        self.follower.install(rev)
        if s.workers <= 1:
            from proxy.dataplane.listener import start_dataplane

            self.dataplane = await start_dataplane(s, self.holder, self.stats, sock=self._listener,
                                                     state_dir=state_dir(s))
            self.follower.listeners.append(self.dataplane.table_changed)
        else:
            await self._spawn_workers()
            self.follower.listeners.append(self._tell_workers)
        self.follower.start()
        # Installed with one worker too: SIGHUP's default action would kill the proxy on the spot.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.restart_workers)
        await self._start_admin()
        from proxy import data_plane_build

        log(f"proxy listening on http://{_hostport(s.listen)} ({s.workers} worker(s), data plane "
            f"{data_plane_build()}); "
            f"admin API on http://{_hostport(s.admin)}; store {self.store.url}; revision {rev.number}")

    def _bind(self) -> None:
        s = self.settings
        if s.workers <= 1:
            self._listener = listen_socket(s.listen, "--listen")
        else:
            # SO_REUSEPORT lets any process of this user join a port, so a second proxy started on it would
            # silently take a share of the connections. A socket without SO_REUSEPORT binds only where nothing
            # listens: binding one first is the check. It is the kernel's own rule, so it also catches other
            # programs and overlapping addresses (0.0.0.0 against 127.0.0.1), which a lock file keyed by the
            # address would miss; what it leaves is two proxies starting within the same few microseconds.
            listen_socket(s.listen, "--listen", listen=False).close()
            for _ in range(s.workers):
                # Not inheritable (uvloop's spawn does not close other descriptors): each worker gets only its
                # own slot's socket through pass_fds, so the socket is gone once that worker closes it.
                self._slots.append(listen_socket(s.listen, "--listen", reuse_port=True))
                self._generation.append(0)
        self._admin_sock = listen_socket(s.admin, "--admin")

    async def _spawn_workers(self) -> None:
        s = self.settings
        from proxy.telemetry.metrics import reset_directory

        reset_directory(metrics_dir(s))
        started = [await self._start_worker(i) for i in range(s.workers)]
        for i, proc in enumerate(started):
            if not await self._ready(proc):
                raise OSError(f"worker {i} did not start (exit code {proc.returncode})")
        self.workers = started
        loop = asyncio.get_running_loop()
        self._keepers = [loop.create_task(self._keep(i)) for i in range(s.workers)]

    def stopping(self) -> bool:
        return self._stopping

    def _worker_id(self, slot: int) -> str:
        g = self._generation[slot]
        return str(slot) if g == 0 else f"{slot}-{g}"

    async def _start_worker(self, slot: int) -> asyncio.subprocess.Process:
        fd = self._slots[slot].fileno()
        ready_r, ready_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "_worker", "--id", self._worker_id(slot), "--listen-fd", str(fd),
                "--ready-fd", str(ready_w), "--settings-json", settings_to_json(self.settings),
                stdin=asyncio.subprocess.PIPE, pass_fds=(fd, ready_w))
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)  # the child has its copy; EOF on ready_r then means the child is gone
        self._ready_pipes[proc] = ready_r
        return proc

    async def _ready(self, proc: asyncio.subprocess.Process) -> bool:
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

    async def _follow_reports(self, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader,
                              transport: asyncio.BaseTransport) -> None:
        try:
            while line := await reader.readline():
                word = line.split()
                if len(word) == 2 and word[0] == b"installed" and word[1].isdigit():
                    self._installed[proc] = max(self._installed.get(proc, 0), int(word[1]))
                    self._report()
        finally:
            # End of file: the worker is gone, so no write waits for it.
            transport.close()
            self._installed.pop(proc, None)
            self._report()

    def _report(self) -> None:
        self._reported.set()
        self._reported = asyncio.Event()

    async def routed(self, revision: int) -> None:
        """Return once every running worker (draining ones too) routes with `revision`, or after
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
            proc = self.workers[slot]
            started = time.monotonic()
            code = await proc.wait()
            if self._stopping:
                return
            if proc is not self.workers[slot]:
                continue  # replaced by a rolling restart; watch the new one
            if time.monotonic() - started > 10 * WORKER_RESTART_BACKOFF[1]:
                delay = WORKER_RESTART_BACKOFF[0]  # a worker that ran a while is not a crash loop
            log(f"worker {self._worker_id(slot)} exited with code {code}; starting it again in {delay:g}s "
                "(connections queued on its socket wait for it)")
            self._retire_published(self._worker_id(slot))
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, WORKER_RESTART_BACKOFF[1])
                if self.stopping():  # set by stop() while this task slept
                    return
                new, ok = await self._next_worker(slot)
                if ok:
                    self.restarts += 1
                    break
                log(f"worker {self._worker_id(slot)} did not start (exit code {new.returncode}); "
                    f"trying again in {delay:g}s")

    async def _next_worker(self, slot: int) -> tuple[asyncio.subprocess.Process, bool]:
        """Start the slot's next worker and, once it serves, make it the slot's current one (and tell it the
        revision being served). -> (the process, whether it serves)."""
        self._generation[slot] += 1
        new = await self._start_worker(slot)
        if not await self._ready(new):
            return new, False
        self.workers[slot] = new
        self._tell_one(new, self.holder.table)
        return new, True

    def _retire_published(self, worker_id: str) -> None:
        try:
            from proxy.telemetry.metrics import retire_published
        except ImportError:
            return
        retire_published(metrics_dir(self.settings), worker_id)

    def restart_workers(self) -> None:
        """SIGHUP: replace every worker, one slot at a time (a second SIGHUP meanwhile is ignored)."""
        if not self._slots:
            log("SIGHUP ignored: a rolling restart replaces worker processes; this proxy runs one process "
                "(start it with --workers 2 or more)")
            return
        if self._stopping or (self._restarting is not None and not self._restarting.done()):
            log("rolling restart already in progress")
            return
        self._restarting = asyncio.get_running_loop().create_task(self._rolling_restart())

    async def _rolling_restart(self) -> None:
        n = len(self.workers)
        log(f"rolling restart of {n} worker(s)")
        for slot in range(n):
            if self._stopping:
                return
            old, old_id = self.workers[slot], self._worker_id(slot)
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
            self._retire_published(old_id)
            log(f"rolling restart: slot {slot} replaced ({slot + 1}/{n})")
        log("rolling restart done")

    @staticmethod
    def _tell_one(proc: asyncio.subprocess.Process, table: RouteTable) -> None:
        # Also sent to a worker that just started: it may have read the store just before this revision.
        if proc.stdin is not None and proc.returncode is None:
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.write(f"{table.revision}\n".encode())

    def _tell_workers(self, table: RouteTable) -> None:
        for proc in self.workers:
            self._tell_one(proc, table)

    def health_view(self) -> dict[str, dict[str, bool]]:
        if self.dataplane is not None:
            return {v: dict(eps) for v, eps in self.dataplane.health_view().items()}
        try:
            from proxy.telemetry.metrics import worker_extras
        except ImportError:
            return {}
        merged: dict[str, dict[str, bool]] = {}
        for extra in worker_extras(metrics_dir(self.settings)):
            for v, eps in extra.get("health", {}).items():
                for ep, up in eps.items():
                    merged.setdefault(v, {})[ep] = merged.get(v, {}).get(ep, False) or bool(up)
        return merged

    async def _start_admin(self) -> None:
        from aiohttp import web

        from proxy.admin.app import create_app
        from proxy.admin.auth import load_tokens
        from proxy.admin.context import AdminContext
        from proxy.admin.tokens import TOKEN_FILE_NAME

        sdir = state_dir(self.settings)
        # Whether this start creates the generated token file or reuses it (then it is not "written").
        existed = (sdir / TOKEN_FILE_NAME).exists()
        tokens, written = load_tokens(self.settings, sdir)
        if written is not None:
            log(f"admin token read from {written}" if existed else f"admin token written to {written} (mode 0600)")
        self.ctx = AdminContext(settings=self.settings, store=self.store, holder=self.holder, stats=self.stats,
                                health=self.health_view, tokens=tokens)
        self.ctx.extras["on_table"] = [self.follower.on_table]
        if self.settings.workers > 1:
            self.ctx.extras["routed"] = self.routed
        self.ctx.extras["metrics_dir"] = metrics_dir(self.settings) if self.settings.workers > 1 else None
        app = create_app(self.ctx)
        self.admin_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.admin_runner.setup()
        assert self._admin_sock is not None
        site = web.SockSite(self.admin_runner, self._admin_sock)
        await site.start()
        for svc in self._optional_services():
            try:
                await svc.start()
                self.services.append(svc)
            except Exception as e:
                log(f"{type(svc).__name__} did not start: {e}")

    def _optional_services(self) -> list[Any]:
        from proxy.control.leader import leader_for
        from proxy.providers.local import LocalProvider

        # One election for both providers, so with several replicas on etcd the same replica runs the local
        # processes and the containers.
        providers = leader_for(self.store, "providers")
        out: list[Any] = [LocalProvider(self.store, leader=providers, state_dir=state_dir(self.settings))]
        try:
            from proxy.control.canary import CanaryController
        except ImportError:
            pass
        else:
            out.append(CanaryController(self.ctx, self._stats_source()))
        # Always on: with no docker versions it only watches the store, and an absent engine is reported
        # once, not fatal, so `turnout deploy` works against any running proxy.
        from proxy.providers.containers import DockerProvider

        provider = DockerProvider(self.store, leader=providers)
        self.ctx.extras["docker"] = provider
        out.append(provider)
        return out

    def _stats_source(self) -> Callable[[], Any]:
        try:
            from proxy.telemetry.metrics import aggregate
        except ImportError:
            return lambda: self.stats
        directory = metrics_dir(self.settings) if self.settings.workers > 1 else None
        return lambda: aggregate(self.stats, directory)

    async def stop(self) -> None:
        self._stopping = True
        grace = self.settings.timeouts.shutdown_grace
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for t in self._keepers:
            t.cancel()
        if self._restarting is not None:
            self._restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarting
        for svc in reversed(self.services):
            with contextlib.suppress(Exception):
                await svc.stop()
        if self.dataplane is not None:
            await self.dataplane.shutdown(grace)
        # Closed before the workers are told to stop: each closes its copy as its drain starts, so the socket
        # is gone then and a new connection is refused at once, instead of waiting where no one accepts.
        for sock in self._slots:
            sock.close()
        procs = [*self.workers, *self.retiring]
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
        await self.follower.stop()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        for own in (self._listener, self._admin_sock):
            if own is not None:
                own.close()
        await self.store.close()


async def run_supervisor(settings: Settings, on_ready: Callable[[Supervisor], None] | None = None) -> None:
    stopper = StopSignal()
    sup = Supervisor(settings)
    try:
        await sup.start()
        if on_ready is not None:
            on_ready(sup)
        await stopper.wait()
        log("stopping: finishing in-flight requests")
    finally:
        stopper.close()
        await sup.stop()


def _hostport(hp: tuple[str, int]) -> str:
    return f"[{hp[0]}]:{hp[1]}" if ":" in hp[0] else f"{hp[0]}:{hp[1]}"


def run(coro: Any) -> None:
    import uvloop

    uvloop.run(coro)
