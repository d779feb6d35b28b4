"""Revision stores. `open_store(url)` picks the back end: sqlite:///path (default) or etcd://host:port/prefix."""

from __future__ import annotations

from proxy.store.base import GENESIS, Revision, RevisionInfo, Store
from proxy.store.etcd import EtcdStore
from proxy.store.sqlite import SQLiteStore, default_path

__all__ = ["GENESIS", "Revision", "RevisionInfo", "SQLiteStore", "Store", "default_path", "open_store"]


def open_store(url: str | None) -> Store:
    if not url:
        return SQLiteStore(default_path())
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        return SQLiteStore(path or default_path())
    if url.startswith("etcd://"):
        return EtcdStore.from_url(url)
    raise ValueError(f"unknown store URL {url!r}: expected sqlite:///path or etcd://host:port/prefix")
