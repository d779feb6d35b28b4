"""proxy/providers/replicas.py: each transition of a replica slot, the status reported for it, and the view
of a replica that only follows the one driving the containers. Pure: no engine."""

from __future__ import annotations

import dataclasses

from proxy.model import Route, State
from proxy.parse import parse_version_body
from proxy.providers.engine import Container, ResolvedImage
from proxy.providers.replicas import (
    Replica,
    ReplicaStatus,
    event_action,
    followed_status,
    replica_status,
    version_status,
)

PIN = "web@sha256:" + "a" * 64


def container(cid: str = "c" * 64, *, running: bool = True, health: str | None = None) -> Container:
    return Container(id=cid, name="turnout-v1-0", version="v1", replica=0, image=PIN, running=running,
                     status="running" if running else "exited", started_at="t0", exit_code=0 if running else 3,
                     health=health, endpoint="http://127.0.0.1:9001")


def test_an_exit_takes_the_replica_out_and_backs_off_doubling_up_to_30s() -> None:
    r = Replica("v1", 0, container=container(), healthy=True)
    assert [r.exited(3, ("boom",), 100.0) for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert (r.container, r.healthy, r.exits, r.retry_at, r.error, r.last_logs) == (
        None, False, 8, 130.0, "exited with code 3", ("boom",))


def test_a_failed_create_counts_as_an_exit() -> None:
    r = Replica("v1", 0)
    r.create_failed("no such image", 10.0)
    r.create_failed("no such image", 10.0)
    assert (r.error, r.exits, r.retry_at) == ("no such image", 2, 11.0)
    r.created(container(), 12.0)
    assert (r.container, r.healthy, r.failures, r.retry_at, r.next_probe) == (container(), False, 0, 0.0, 12.0)


def test_an_adopted_container_is_trusted_only_when_told_and_refreshing_keeps_the_probe_state() -> None:
    r = Replica("v1", 0, failures=2)
    r.running(container(), trusted=True, now=5.0)
    assert (r.healthy, r.ever_healthy, r.failures, r.next_probe) == (True, True, 0, 5.0)
    r.failures = 1
    r.running(container(health="unhealthy"), trusted=False, now=9.0)  # same id: only refreshed
    assert (r.healthy, r.ever_healthy, r.failures, r.next_probe) == (False, True, 1, 5.0)
    other = Replica("v1", 1)
    other.running(container("d" * 64), trusted=False, now=7.0)
    assert (other.healthy, other.ever_healthy, other.next_probe) == (False, False, 7.0)


def test_three_failed_probes_in_a_row_take_a_healthy_replica_out_of_rotation() -> None:
    r = Replica("v1", 0, container=container())
    assert r.probed(None, "/healthz") is False
    assert (r.healthy, r.ever_healthy) == (True, True)
    assert [r.probed("status 500", "/healthz") for _ in range(4)] == [False, False, True, False]
    assert (r.healthy, r.failures, r.error) == (False, 4, "health check /healthz: status 500")
    assert r.probed(None, "/healthz") is False
    assert (r.healthy, r.failures, r.error) == (True, 0, None)
    r.no_endpoint()
    assert (r.healthy, r.error) == (False, "no endpoint (is the port published?)")


def test_events_change_only_the_container_they_name() -> None:
    r = Replica("v1", 0, container=container(), healthy=True)
    r.on_event("die", "x" * 64)
    assert (r.healthy, r.container) == (True, container())
    r.on_event("health_status: unhealthy", "c" * 64)
    assert (r.healthy, r.container) == (False, container(health="unhealthy"))
    r.on_event("die", "c" * 64)
    assert (r.healthy, r.container) == (False, dataclasses.replace(container(health="unhealthy"), running=False))
    assert event_action({"Action": "health_status: healthy", "id": "c1"}) == ("health_status: healthy", "c1")
    assert event_action({"status": "die", "id": "c1"}) == ("die", "c1")
    assert event_action({}) == ("", "")


def test_replica_status_names_each_state() -> None:
    states = [
        replica_status(Replica("v1", 0)).state,
        replica_status(Replica("v1", 0, exits=1)).state,
        replica_status(Replica("v1", 0, container=container(running=False))).state,
        replica_status(Replica("v1", 0, container=container(), healthy=True, ever_healthy=True)).state,
        replica_status(Replica("v1", 0, container=container(), ever_healthy=True)).state,
        replica_status(Replica("v1", 0, container=container())).state,
    ]
    assert states == ["missing", "exited", "exited", "healthy", "unhealthy", "starting"]
    assert replica_status(Replica("v1", 2, container=container(), exits=1, error="e", last_logs=("l",))) == \
        ReplicaStatus(2, "starting", "c" * 12, "turnout-v1-0", "http://127.0.0.1:9001", "t0", 1, "e", ("l",))


def _state(replicas: int, endpoints: tuple[str, ...] = ()) -> State:
    v = parse_version_body({"image": PIN, "replicas": replicas, "network": "host"}, "v1", 1.0)
    v = dataclasses.replace(v, endpoints=endpoints)
    return State(versions={"v1": v}, routes=(Route("web", split=(("v1", 1),)),))


def test_version_status_lists_wanted_slots_and_leftovers_and_spots_a_crash_loop() -> None:
    state = _state(2)
    img = ResolvedImage(PIN, "sha256:" + "b" * 64)
    crashing = {("v1", 0): Replica("v1", 0, exits=2), ("v1", 1): Replica("v1", 1, exits=3),
                ("v1", 2): Replica("v1", 2, container=container(), healthy=True, ever_healthy=True)}
    s = version_status("v1", state.versions["v1"], state, crashing, img, None)
    assert ([r.state for r in s.replicas], s.healthy, s.running, s.failing, s.image_id, s.routes) == (
        ["exited", "exited", "healthy"], 1, 1, True, "sha256:" + "b" * 64, ("web",))
    s = version_status("v1", state.versions["v1"], state, {}, None, "no such image")
    assert ([r.state for r in s.replicas], s.failing, s.image_id, s.error) == (
        ["missing", "missing"], False, None, "no such image")


def test_a_follower_reports_the_recorded_instances_as_healthy_and_the_rest_missing() -> None:
    state = _state(3, ("http://127.0.0.1:9001",))
    s = followed_status("v1", state.versions["v1"], state, "replica-b")
    assert [(r.state, r.endpoint, r.error) for r in s.replicas] == [
        ("healthy", "http://127.0.0.1:9001", None),
        ("missing", None, "driven by another replica (replica-b)"),
        ("missing", None, "driven by another replica (replica-b)")]
    assert (s.desired, s.healthy, s.running, s.instances) == (3, 1, 1, ("http://127.0.0.1:9001",))
    assert followed_status("v1", state.versions["v1"], state, None).replicas[1].error == \
        "driven by another replica (election pending)"
