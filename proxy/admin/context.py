"""What the admin application needs from the rest of the process, in one object.

The admin app is built by proxy.admin.app.create_app(ctx). Feature modules (observability, canary,
docker) add their endpoints through `routes(ctx)` functions that app.py includes, so each owns its file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.settings import Settings
from proxy.store.base import Store
from proxy.table import TableHolder
from proxy.telemetry.stats import Stats

# version -> endpoint URL -> healthy? (as the data plane currently sees it)
HealthView = Callable[[], Mapping[str, Mapping[str, bool]]]


@dataclass
class AdminContext:
    settings: Settings
    store: Store
    holder: TableHolder
    stats: Stats  # this process's stats; proxy.telemetry.metrics sums across workers at scrape time
    health: HealthView = field(default=lambda: {})
    # bearer token -> actor name recorded in history
    tokens: Mapping[str, str] = field(default_factory=dict)
    # Free-form slots for feature modules (canary controller, docker provider), keyed by module name.
    extras: dict[str, Any] = field(default_factory=dict)
