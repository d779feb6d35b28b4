"""proxy/providers/events.py: Docker events read on their own thread reach the event loop in order; each
(re)connect asks for a full pass; close() ends the blocking read and join() the thread."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from proxy.errors import TurnoutError
from proxy.providers.engine import Engine
from proxy.providers.events import EngineEvents

END = object()


class FakeStream:
    def __init__(self) -> None:
        self.q: queue.Queue[object] = queue.Queue()

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        while (ev := self.q.get()) is not END:
            assert isinstance(ev, dict)
            yield ev

    def close(self) -> None:
        self.q.put(END)


class FakeEngine(Engine):
    def __init__(self, fail_first: bool = False) -> None:
        super().__init__(None)
        self.fail_first = fail_first
        self.streams: list[FakeStream] = []
        self.calls: list[str] = []
        self.opened = threading.Event()

    def events(self, state_id: str) -> Any:
        self.calls.append(state_id)
        if self.fail_first and len(self.calls) == 1:
            raise TurnoutError("engine down")
        self.streams.append(FakeStream())
        self.opened.set()
        return self.streams[-1]


class Calls:
    """What a callback was given, on which thread; `done` is set once `want` calls arrived."""

    def __init__(self, want: int) -> None:
        self.want = want
        self.items: list[tuple[object, bool]] = []
        self.done = asyncio.Event()
        self.loop_thread = threading.get_ident()

    def add(self, item: object = None) -> None:
        self.items.append((item, threading.get_ident() == self.loop_thread))
        if len(self.items) >= self.want:
            self.done.set()

    async def wait(self) -> None:
        async with asyncio.timeout(5.0):
            await self.done.wait()


async def test_events_reach_the_loop_in_order_and_close_ends_the_thread() -> None:
    engine = FakeEngine()
    seen, kicks = Calls(3), Calls(1)
    follower = EngineEvents(engine, "state1", on_event=lambda ev: seen.add(ev["Action"]), kick=kicks.add)
    follower.start(asyncio.get_running_loop())
    await asyncio.to_thread(engine.opened.wait, 5.0)
    for action in ("start", "die", "destroy"):
        engine.streams[0].q.put({"Action": action, "id": "c1"})
    await seen.wait()
    assert seen.items == [("start", True), ("die", True), ("destroy", True)]
    assert kicks.items == [(None, True)]  # the connect asked for a full pass, on the loop
    await follower.close()
    await follower.join()
    assert follower._thread is not None and not follower._thread.is_alive()
    assert engine.calls == ["state1"]


async def test_a_lost_stream_is_reopened_and_each_attempt_asks_for_a_pass() -> None:
    engine = FakeEngine(fail_first=True)
    kicks = Calls(3)
    follower = EngineEvents(engine, "state1", on_event=lambda ev: None, kick=kicks.add)
    follower.start(asyncio.get_running_loop())
    await asyncio.to_thread(engine.opened.wait, 5.0)  # after the first backoff (0.5 s)
    await kicks.wait()
    # The failure asked twice (lost, then about to retry), the reconnect once.
    assert (engine.calls, len(kicks.items)) == (["state1", "state1"], 3)
    await follower.close()
    await follower.join()
    assert not follower._thread.is_alive()  # type: ignore[union-attr]
