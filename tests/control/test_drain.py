"""Drain bookkeeping with requests recorded into Stats directly (the end-to-end drain is in test_e2e.py)."""

from __future__ import annotations

import pytest

from proxy import changes
from proxy.control.canary import counters_of
from proxy.control.canary.drain import Drain, drain_weights, load_drain, observe, start_drain
from proxy.errors import ConflictError, ValidationError
from proxy.model import Route
from tests.control.conftest import World, seed, two_versions


def test_drain_weights_move_the_old_weight_to_the_new_version() -> None:
    r = Route("web", split=(("v1", 70.0), ("v2", 20.0), ("v3", 10.0)))
    assert drain_weights(r, "v1", "v2") == {"v1": 0.0, "v2": 90.0}
    assert drain_weights(r, "v1", "v4") == {"v1": 0.0, "v4": 70.0}
    with pytest.raises(ValidationError, match="from: version 'v9' is not in route 'web'"):
        drain_weights(r, "v9", "v2")


def test_observe_counts_old_traffic_and_declares_drained_after_the_quiet_period() -> None:
    d = Drain("web", "v1", "v2", 5.0, "draining", "alice", 100.0, 100.0, last_seen=100.0)
    d = observe(d, 40, None, 101.0)  # first look: a baseline, nothing counted
    assert (d.old_requests, d.last_seen) == (0, 100.0)
    d = observe(d, 45, 40, 103.0)
    assert (d.status, d.old_requests, d.last_seen) == ("draining", 5, 103.0)
    d = observe(d, 45, 45, 107.9)
    assert d.status == "draining"
    d = observe(d, 45, 45, 108.0)
    assert d.status == "drained"
    assert d.message == ("v1 drained: no session traffic for 5.0s (5 request(s) served to old sessions since "
                         "the drain began)")
    assert observe(d, 99, 45, 200.0) == d  # finished drains do not change


async def test_drain_needs_an_assignment_cookie(world: World) -> None:
    with pytest.raises(ConflictError, match="route 'web' has no assignment_cookie"):
        await start_drain(world.store, {}, "web", "v1", "v2", actor="alice", now=world.clock())


async def test_drain_needs_a_sticky_route(world: World) -> None:
    await world.store.update(lambda s: changes.put_route(s, Route("web", split=(("v1", 100.0),), sticky=False,
                                                              assignment_cookie="tv")), actor="t")
    with pytest.raises(ConflictError, match="route 'web' is not sticky"):
        await start_drain(world.store, {}, "web", "v1", "v2", actor="alice", now=world.clock())


async def test_drain_tracks_old_sessions_until_quiet(world: World) -> None:
    await world.store.update(lambda s: changes.put_route(s, Route("web", split=(("v1", 100.0),),
                                                              assignment_cookie="tv")), actor="t")
    d = await start_drain(world.store, {}, "web", "v1", "v2", quiet=30.0, actor="alice", now=world.clock())
    assert d.status == "draining"
    assert await world.split() == {"v1": 0.0, "v2": 100.0}
    ctl = world.controller()
    world.feed("v1", 10)  # before the first observation: not counted
    await ctl.tick()
    for _ in range(3):  # old sessions keep coming for a while
        world.clock.advance(20.0)
        world.feed("v1", 2)
        world.feed("v2", 50)
        await ctl.tick()
    world.clock.advance(29.0)
    await ctl.tick()
    stored = await load_drain(world.store, "web")
    assert stored is not None and stored.status == "draining"
    world.clock.advance(1.0)
    await ctl.tick()
    stored = await load_drain(world.store, "web")
    assert stored is not None and stored.status == "drained"
    assert stored.old_requests == 6
    info = (await world.store.history(route="web", limit=1))[0]
    assert (info.actor, info.summary) == ("alice", "drain web: v1 drained into v2")
    assert info.reason == ("v1 drained: no session traffic for 30.0s (6 request(s) served to old sessions since "
                           "the drain began); released: its sessions now follow the split")


async def test_drain_refuses_an_unready_target(world: World) -> None:
    await seed(world.store, two_versions(cookie="tv"))
    with pytest.raises(ConflictError, match="'v2' has no healthy endpoint"):
        await start_drain(world.store, {"v2": {"http://127.0.0.1:9002": False}}, "web", "v1", "v2",
                          actor="alice", now=world.clock())
    assert await world.split() == {"v1": 100.0}


async def test_old_sessions_right_after_the_start_count_and_reset_the_quiet_timer(world: World) -> None:
    await world.store.update(lambda s: changes.put_route(s, Route("web", split=(("v1", 100.0),),
                                                              assignment_cookie="tv")), actor="t")
    ctl = world.controller()
    world.feed("v1", 10)  # before the drain: v1's ordinary traffic, not the drain's business
    started = world.clock()
    await start_drain(world.store, {}, "web", "v1", "v2", quiet=30.0, actor="alice", now=started,
                      old_requests=lambda: counters_of(world.snapshot(), "web", ["v1"]).requests)
    world.feed("v1", 3)  # old sessions right after the start, before the tracker's first look
    world.clock.advance(25.0)
    await ctl.tick()
    world.clock.advance(29.0)  # 54 s after the start, 29 s after the requests were seen: not quiet yet
    await ctl.tick()
    stored = await load_drain(world.store, "web")
    assert stored is not None
    assert (stored.status, stored.old_requests, stored.last_seen) == ("draining", 3, started + 25.0)
    world.clock.advance(1.0)
    await ctl.tick()
    stored = await load_drain(world.store, "web")
    assert stored is not None
    assert (stored.status, stored.old_requests) == ("drained", 3)


async def test_a_drained_version_is_released_from_the_split(world: World) -> None:
    await world.store.update(lambda s: changes.put_route(s, Route("web", split=(("v1", 100.0),),
                                                              assignment_cookie="tv")), actor="t")
    await start_drain(world.store, {}, "web", "v1", "v2", quiet=5.0, actor="alice", now=world.clock())
    assert await world.split() == {"v1": 0.0, "v2": 100.0}
    ctl = world.controller()
    await ctl.tick()
    world.clock.advance(5.0)
    await ctl.tick()
    # Dropped from the split, the assignment cookie no longer holds sessions on v1: they follow the split.
    assert await world.split() == {"v2": 100.0}
    info = (await world.store.history(route="web", limit=1))[0]
    assert (info.actor, info.summary, info.routes) == ("alice", "drain web: v1 drained into v2", ("web",))
    assert info.reason == ("v1 drained: no session traffic for 5.0s (0 request(s) served to old sessions since the "
                           "drain began); released: its sessions now follow the split")
    before = await world.store.current()
    await ctl.tick()
    assert (await world.store.current()).number == before.number


async def test_a_drained_version_in_the_fallback_chain_is_said_to_keep_its_sessions(world: World) -> None:
    await world.store.update(lambda s: changes.put_route(s, Route("web", split=(("v1", 100.0),), fallback=("v1",),
                                                              assignment_cookie="tv")), actor="t")
    await start_drain(world.store, {}, "web", "v1", "v2", quiet=5.0, actor="alice", now=world.clock())
    ctl = world.controller()
    await ctl.tick()
    world.clock.advance(5.0)
    await ctl.tick()
    assert await world.split() == {"v2": 100.0}
    stored = await load_drain(world.store, "web")
    assert stored is not None and stored.message.endswith(
        "; v1 is still in the route's fallback chain, so sessions assigned to it keep reaching it until it is "
        "removed from there")
