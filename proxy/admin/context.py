"""What the admin application needs from the rest of the process, in one object.

Design rule: every field is typed and set by whoever builds the process (the supervisor, or a test); no
free-form slots. The admin app is built by proxy.admin.app.create_app(ctx); feature modules (observability,
canary, docker) add their endpoints through `routes(ctx)` functions that app.py includes, so each owns its
file. Writes reach the data plane only through `watcher` (proxy.control.watcher), never by building a table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxy.control.canary.controller import CanaryController
from proxy.control.gates import HealthView
from proxy.control.rechecks import Rechecker
from proxy.control.watcher import Watcher
from proxy.providers.containers import DockerProvider
from proxy.providers.docker_zones import DockerZones
from proxy.settings import Settings
from proxy.store.base import Store
from proxy.table import TableHolder
from proxy.telemetry.stats import Stats

__all__ = ["AdminContext", "HealthView"]


@dataclass
class AdminContext:
    settings: Settings
    store: Store
    watcher: Watcher  # the one install path: a write commits, then waits for watcher.installed
    stats: Stats  # this process's stats; proxy.telemetry.metrics sums across workers at scrape time
    health: HealthView = field(default=lambda: {})
    # bearer token -> actor name recorded in history
    tokens: Mapping[str, str] = field(default_factory=dict)
    # The process's canary controller, when it runs one (the admin API then sends commands to it).
    canary: CanaryController | None = None
    # The process's re-check schedule, when it runs one (`check-version` then goes through it).
    rechecks: Rechecker | None = None
    # The running Docker provider, when the supervisor started one (one engine per zone: DockerZones).
    docker: DockerProvider | DockerZones | None = None
    # The directory worker processes publish their statistics into (None with a single process).
    metrics_dir: Path | None = None

    @property
    def holder(self) -> TableHolder:
        return self.watcher.holder
