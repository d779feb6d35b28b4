"""Gates a version must pass before it may receive traffic: readiness and an optional check command.

Design rule: gates guard *increases* of traffic only. Taking weight away (a rollback, a drain) is never
refused, because the way back must always be open. Readiness is a pure function of the state and the
data plane's health view; the check command (e.g. an image vulnerability scanner) runs once per version
(versions are immutable, so a pass holds) and its verdict is written to history either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace

from proxy.changes import Change, reachable
from proxy.errors import ConflictError, StaleRevisionError
from proxy.model import State, Version
from proxy.store.base import Revision, Store

# A scanner pulling a vulnerability database can take minutes; longer than this is a hung check.
CHECK_TIMEOUT = 300.0
# How much of a check's output is kept in history: enough for the findings' summary line(s).
OUTPUT_TAIL_CHARS = 2000
OUTPUT_TAIL_LINES = 10
# Output kept while a check runs: a chatty scanner must not grow the proxy's memory without bound.
OUTPUT_KEEP_BYTES = 64 * 1024
# An event record races only with real changes; a handful of retries outlasts any burst of them.
RECORD_ATTEMPTS = 10
# A gated write re-plans when a concurrent change lets another checked version in; as for RECORD_ATTEMPTS.
GATE_ATTEMPTS = 10

HealthMap = Mapping[str, Mapping[str, bool]]  # version -> endpoint -> healthy?
HealthView = Callable[[], HealthMap]  # the data plane's health as it is now


def version_ready(version: Version, health: HealthMap) -> str | None:
    """None when `version` may take traffic, else why not.

    A version the data plane has not reported on yet (no active health check, or not probed yet) counts
    as ready when it has instances: passive ejection and fallback still protect requests.
    """
    if not version.endpoints:
        return f"version {version.name!r} has no instances"
    seen = health.get(version.name)
    if seen and not any(seen.values()):
        return f"version {version.name!r} has no healthy endpoint (0 of {len(seen)} healthy)"
    return None


def check_readiness(state: State, new_weights: Mapping[str, float], health: HealthMap, *,
                    route: str | None = None, force: bool = False) -> None:
    """Refuse (ConflictError, 409) to give weight > 0 to a version with no healthy endpoint.

    With `route`, only versions whose weight rises on that route are checked, so an operator can still
    re-balance the others while one version is down. `force` skips the gate (the operator knows better).
    """
    if force:
        return
    r = None if route is None else state.route(route)
    before = {} if r is None else dict(r.split)
    problems = []
    for name, weight in new_weights.items():
        if weight <= 0 or weight <= before.get(name, 0.0):
            continue
        version = state.versions.get(name)
        if version is None:
            continue  # unknown versions are the validator's to report
        why = version_ready(version, health)
        if why is not None:
            problems.append(why)
    if problems:
        raise ConflictError("; ".join(problems) + " (use force to override)")


@dataclass(frozen=True, slots=True)
class CheckVerdict:
    version: str
    ok: bool
    exit_code: int | None  # None: did not exit by itself (timed out, could not start)
    output: str  # tail of stdout+stderr
    duration: float
    time: float
    # A failed re-check of a version that receives traffic (proxy.control.rechecks): it gains no more
    # weight or pins until a check passes again.
    flagged: bool = False

    @property
    def summary(self) -> str:
        verdict = "passed" if self.ok else "FAILED"
        how = "timed out" if self.exit_code is None else f"exit {self.exit_code}"
        last = self.output.strip().splitlines()[-1] if self.output.strip() else "no output"
        return f"check {self.version}: {verdict} ({how}, {self.duration:.1f}s): {last[:200]}"


def _tail(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    lines = text.rstrip().splitlines()[-OUTPUT_TAIL_LINES:]
    return "\n".join(lines)[-OUTPUT_TAIL_CHARS:]


async def run_check(version: Version, timeout: float = CHECK_TIMEOUT) -> CheckVerdict:
    """Run the version's check command with its identity in the environment; never raises."""
    started = time.monotonic()
    env = {
        **os.environ,
        "TURNOUT_VERSION": version.name,
        "TURNOUT_IMAGE": version.spec.image or "",
        "TURNOUT_ENDPOINTS": " ".join(version.endpoints),
    }

    def verdict(ok: bool, code: int | None, output: str) -> CheckVerdict:
        return CheckVerdict(version.name, ok, code, output, time.monotonic() - started, time.time())

    try:
        proc = await asyncio.create_subprocess_exec(
            *version.spec.check, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    except OSError as e:
        return verdict(False, None, f"cannot run {version.spec.check[0]!r}: {e.strerror or e}")
    out = bytearray()

    async def pump() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            out.extend(chunk)
            del out[:-OUTPUT_KEEP_BYTES]

    reader = asyncio.create_task(pump())
    code: int | None
    try:
        code = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        code = None
    # A grandchild may still hold the pipe open; its output is not worth waiting for.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(reader), 1.0)
    reader.cancel()
    if code is None:
        shown = _tail(bytes(out))
        return verdict(False, None, (shown + "\n" if shown else "") + f"(timed out after {timeout:g}s)")
    return verdict(code == 0, code, _tail(bytes(out)))


def _meta_key(version: str) -> str:
    return f"check/{version}"


async def last_verdict(store: Store, version: str) -> CheckVerdict | None:
    raw = await store.get_meta(_meta_key(version))
    return None if raw is None else CheckVerdict(**json.loads(raw))


async def record(store: Store, *, actor: str, summary: str, reason: str = "",
                 routes: tuple[str, ...] = ()) -> Revision:
    """Write an event that changes no state (a verdict, a drain finished) into the revision history."""
    for _ in range(RECORD_ATTEMPTS):
        cur = await store.current()
        try:
            return await store.commit(cur.state, expected=cur.number, actor=actor, reason=reason,
                                      summary=summary, routes=routes)
        except StaleRevisionError:
            continue  # someone committed in between: the event goes after their revision
    raise StaleRevisionError(-1, (await store.current()).number)


async def check_gate(store: Store, version: Version, *, actor: str, routes: tuple[str, ...] = (),
                     timeout: float = CHECK_TIMEOUT, force: bool = False) -> CheckVerdict | None:
    """Run (or reuse a pass of) the version's check command; ConflictError when it fails.

    Returns None when the version has no check. The verdict goes to meta (for status) and to history.
    """
    if not version.spec.check:
        return None
    prior = await last_verdict(store, version.name)
    if prior is not None and prior.ok:
        return prior
    v = await run_check(version, timeout)
    if not v.ok and prior is not None and prior.flagged:
        v = replace(v, flagged=True)  # still failing: still flagged (only a pass unflags)
    await store.set_meta(_meta_key(version.name), json.dumps(asdict(v)))
    await record(store, actor=actor, summary=v.summary, reason=v.output, routes=routes)
    if not v.ok and not force:
        raise ConflictError(f"{v.summary} (version gets no traffic until its check passes)")
    return v


async def admit(store: Store, state: State, new_weights: Mapping[str, float], health: HealthMap, *,
                route: str, actor: str, force: bool = False) -> None:
    """Both gates for a split change, for the admin API's PATCH split: readiness, then check commands."""
    check_readiness(state, new_weights, health, route=route, force=force)
    r = state.route(route)
    before = {} if r is None else dict(r.split)
    for name, weight in new_weights.items():
        version = state.versions.get(name)
        if version is not None and weight > 0 and weight > before.get(name, 0.0):
            await check_gate(store, version, actor=actor, routes=(route,), force=force)


def gaining(old: State, new: State) -> dict[str, tuple[str, ...]]:
    """Versions with a check command that can receive traffic on a route of `new` where they could not in
    `old` (weight from 0, a new pin target, fallback entry or mirror target, a new route), and those routes.

    Only checked versions are looked at: they are the only ones the check gate can refuse, and most states
    have none, so a write without one costs a pass over the versions.
    """
    checked = {name for name, v in new.versions.items() if v.spec.check}
    if not checked:
        return {}
    out: dict[str, list[str]] = {}
    for r in new.routes:
        before = old.route(r.name)
        if before is r:
            continue
        # The same pins mapping (a split change keeps it) reaches the same versions before and after: no
        # pass over it. An equal one read back (a rollback) is scanned: comparing costs more than that.
        same_pins = before is not None and before.pins is r.pins
        gained = reachable(r, checked, pins=not same_pins)
        if gained and before is not None:
            gained -= reachable(before, gained)
        for name in sorted(gained):
            out.setdefault(name, []).append(r.name)
    return {name: tuple(routes) for name, routes in out.items()}


def rising(old: State, new: State, names: set[str]) -> dict[str, tuple[str, ...]]:
    """Of `names`, those whose traffic grows on a route of `new`: weight up, more pins, or newly reachable.

    What a flagged version may not get (on top of `gaining`, which only sees versions newly let in)."""
    out: dict[str, list[str]] = {}
    for r in new.routes:
        before = old.route(r.name)
        if before is r:
            continue
        weights_before = {} if before is None else dict(before.split)
        pins_changed = before is None or before.pins is not r.pins
        for name in names:
            up = dict(r.split).get(name, 0.0) > weights_before.get(name, 0.0)
            if not up and pins_changed and r.pins:
                now = sum(1 for v in r.pins.values() if v == name)
                up = now > (0 if before is None else sum(1 for v in before.pins.values() if v == name))
            if not up:
                up = bool(reachable(r, {name})) and (before is None or not reachable(before, {name}))
            if up:
                out.setdefault(name, []).append(r.name)
    return {name: tuple(routes) for name, routes in out.items()}


class _Ungated(Exception):
    """Raised out of a state transition that would let a version in whose check has not been asked yet."""


async def gated_update(store: Store, change: Callable[[State], Change], *, actor: str, reason: str = "",
                       expected: int | None = None, force: bool = False) -> Revision:
    """`store.update`, where every version the change lets receive traffic passes its check command first.

    The one gate for every write of the admin API (split, pins, routes, apply, rollback): the transition is
    tried; when it would give a checked version traffic it is stopped before committing, the checks run
    (outside the store's compare-and-swap: they may take minutes) and it is tried again. A check's verdict
    is a revision of its own that changes no state, so it does not make the caller's If-Match stale.
    """
    admitted: set[str] = set()
    need: dict[str, tuple[Version, tuple[str, ...]]] = {}  # what the last try would have let in unchecked
    # Checked versions -> flagged by a failed re-check? Read from meta the first time a change meets them
    # (a try is stopped for it), so writes to states without checked versions read nothing more.
    flags: dict[str, bool] = {}
    unread: list[str] = []

    def guarded(state: State) -> Change:
        new, summary = change(state)
        need.clear()
        unread.clear()
        if summary and new is not state:
            found = gaining(state, new)
            checked = [name for name, v in new.versions.items() if v.spec.check]
            unread.extend(name for name in checked if name not in flags)
            if unread:
                raise _Ungated
            flagged = {name for name in checked if flags[name]} - admitted
            if flagged:
                for name, routes in rising(state, new, flagged).items():
                    found[name] = tuple(sorted(set(found.get(name, ())) | set(routes)))
            for name, routes in found.items():
                if name not in admitted and name in new.versions:
                    need[name] = (new.versions[name], routes)
        if need:
            raise _Ungated
        return new, summary

    for _ in range(GATE_ATTEMPTS):
        try:
            return await store.update(guarded, actor=actor, reason=reason, expected=expected)
        except _Ungated:
            pass
        for name in unread:
            verdict = await last_verdict(store, name)
            flags[name] = verdict is not None and verdict.flagged
        ran = False
        for name, (version, routes) in need.items():
            prior = await last_verdict(store, name)
            ran = ran or not (prior is not None and prior.ok)
            await check_gate(store, version, actor=actor, routes=routes, force=force)
            admitted.add(name)
        if ran and expected is not None:
            cur = await store.current()
            if cur.number != expected and (await store.get(expected)).state != cur.state:
                raise StaleRevisionError(expected, cur.number)
            expected = cur.number
    raise StaleRevisionError(-1, (await store.current()).number)
