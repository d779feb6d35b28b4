"""A stand-in worker process for the cross-process tests: records `n` requests, publishes, waits.

argv: directory worker_id n_requests. On SIGTERM it records one more request, then stops its publisher
(which publishes once more on the way out). Prints "ready" once the first publish is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proxy.telemetry.metrics import WorkerPublisher
from proxy.telemetry.stats import Stats


async def main(directory: Path, worker_id: str, n: int) -> None:
    stats = Stats()
    for _ in range(n):
        stats.request("web", "v1", 200, 0.002, 1, 1)
    stats.connection("downstream", 2)
    # A long interval: only the first and the final publish happen, so the test sees exact numbers.
    pub = WorkerPublisher(stats, directory, worker_id, extra=lambda: {"worker": worker_id}, interval=3600)
    task = asyncio.get_running_loop().create_task(pub.run())
    while pub.publishes == 0:  # noqa: ASYNC110 - polling a counter of the object under test
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    stats.request("web", "v1", 200, 0.002, 1, 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
