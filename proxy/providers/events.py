"""Docker events for the Docker provider, followed on a daemon thread of their own.

Design rule: the SDK's event stream blocks, so it is read off the event loop; every event and every
reconnect is handed to the loop with call_soon_threadsafe and handled there, so the provider's bookkeeping
is only ever touched from the loop. A lost stream is reopened with backoff, and each (re)connect asks for
a full pass, since events may have been missed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import Any

from proxy.providers.engine import Engine

# Reconnect backoff (seconds): first retry quickly, then settle at a cheap poll.
RECONNECT_BACKOFF = (0.5, 5.0)


class EngineEvents:
    """`start(loop)` ... `close()` then `await join()`: `on_event` gets each event, `kick` each (re)connect."""

    def __init__(self, engine: Engine, state_id: str, *, on_event: Callable[[Mapping[str, Any]], None],
                 kick: Callable[[], None]) -> None:
        self.engine = engine
        self.state_id = state_id
        self.on_event = on_event
        self.kick = kick
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stream: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._follow, name="turnout-docker-events", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop following: closing the stream ends the thread's blocking read."""
        self._stop.set()
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(stream.close)

    async def join(self) -> None:
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)

    def _follow(self) -> None:
        delay = RECONNECT_BACKOFF[0]
        while not self._stop.is_set():
            try:
                stream = self.engine.events(self.state_id)
                self._stream = stream
                self._from_thread(self.kick)  # events may have been missed while disconnected
                delay = RECONNECT_BACKOFF[0]
                for ev in stream:
                    self._from_thread(self.on_event, ev)
            except Exception:
                if not self._stop.is_set():
                    # The reconcile pass reports the engine's state with a clearer message.
                    self._from_thread(self.kick)
            finally:
                self._stream = None
            if not self._stop.is_set():
                self._from_thread(self.kick)
            self._stop.wait(delay)
            delay = min(delay * 2, RECONNECT_BACKOFF[1])

    def _from_thread(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)
