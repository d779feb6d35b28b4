"""The README and docs/ link to each other by relative paths and anchors: every one must resolve.

The reference moved from one long README into docs/ pages; a link to a section that moved or was renamed
would otherwise break silently.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.routefile import load_route_file

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens (code blocks skipped)."""
    out: set[str] = set()
    fence = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"^#{1,6} (.*)", line)):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert broken == []


def test_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_the_readmes_route_file_examples_are_valid() -> None:
    # Every README block that defines versions (native, HTTPRoute, gRPC, zones) must be a route file turnout
    # accepts as it stands: an example that no longer parses is a broken promise on the first page.
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    examples = [b for b in blocks if "versions:" in b or "kind: HTTPRoute" in b]
    states = [load_route_file(b) for b in examples]
    assert [sorted(s.versions) for s in states] == [["v1", "v2"], ["v1", "v2"], ["v1", "v2"], ["v2"]]
