"""proxy/settings.py: the defaults."""

from __future__ import annotations

from proxy.settings import Settings


def test_default_listeners_are_loopback() -> None:
    s = Settings()
    assert (s.admin[0], s.listen[0]) == ("127.0.0.1", "127.0.0.1")
