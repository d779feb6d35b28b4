"""proxy/admin/observe.py: the status page is served with headers that forbid framing and foreign scripts,
and escapes every stored string it shows."""

from __future__ import annotations

import re
from pathlib import Path

from tests.admin.conftest import Admin


async def test_status_page_headers_forbid_framing_and_foreign_scripts(admin: Admin) -> None:
    r = await admin.call("GET", "/ui", token=None)
    assert r.status == 200
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"


UI = Path(__file__).resolve().parents[2] / "proxy" / "admin" / "ui" / "index.html"
# Interpolations of stored strings (route, version, host, prefix, actor, reason, summary) inside HTML templates.
_STORED = re.compile(r"\$\{\s*(?:[a-z]+\.)?(?:name|host|path_prefix|actor|reason|summary|version)\s*\}")


def test_status_page_escapes_every_stored_string_it_interpolates() -> None:
    text = UI.read_text()
    raw = [m.group(0) for m in _STORED.finditer(text)]
    assert raw == [], f"unescaped interpolations in index.html: {raw}"
    assert "const esc = " in text
