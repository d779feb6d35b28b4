"""`--routes FILE`: the route file a proxy starts from.

Design rule (the restart rule): the file seeds an empty store; later it is applied as a new revision only
when its content changed since it was last applied (its digest is kept in the store's meta), so a restart
never undoes live changes. It passes the check gate like `turnout apply`, and an invalid file leaves the
stored state serving.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from proxy.changes import apply_document
from proxy.control import gates
from proxy.errors import ConflictError, FieldError, ValidationError
from proxy.model import State
from proxy.routefile import load_route_file
from proxy.store.base import Revision, Store
from proxy.supervisor.process import log
from proxy.telemetry.stats import Stats

ROUTES_FILE_META = "routes_file.sha256"


async def seed_from_file(store: Store, path: str, stats: Stats | None = None) -> Revision:
    """Apply the route file per the restart rule; an invalid file leaves the stored state serving."""
    text = Path(path).read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode()).hexdigest()
    current = await store.current()
    if current.number > 0 and await store.get_meta(ROUTES_FILE_META) == digest:
        log(f"{path} unchanged since it was last applied; serving revision {current.number}")
        return current

    warnings: list[FieldError] = []

    def change(state: State) -> tuple[State, str]:
        warnings.clear()
        return apply_document(state, load_route_file(text, now=time.time(), current=state, warnings=warnings))

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
    for w in warnings:
        log(f"{path}: warning: {w}")
    await store.set_meta(ROUTES_FILE_META, digest)
    if rev.number != current.number:
        log(f"applied {path} as revision {rev.number}: {rev.info.summary}")
    return rev
