"""Shared cross-request state of one proxy process: the current route table, swapped whole."""

from __future__ import annotations

from proxy.table import EMPTY_TABLE, RouteTable


class TableHolder:
    """Readers take `holder.table` once per request; writers replace it whole, never mutate it."""

    __slots__ = ("table",)

    def __init__(self, table: RouteTable = EMPTY_TABLE) -> None:
        self.table = table

    def __repr__(self) -> str:
        return f"<TableHolder {self.table!r}>"

    def offer(self, table: RouteTable) -> bool:
        """Install `table` unless a newer revision is already installed (watchers and writers race)."""
        if table.revision < self.table.revision:
            return False
        self.table = table
        return True
