"""The documents: the README stays a front door, and every relative link in it and in docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def anchors(path: Path) -> set[str]:
    """Explicit `<a id>` anchors and GitHub's heading anchors of a markdown file."""
    text = path.read_text()
    ids = set(re.findall(r'<a id="([^"]+)"', text))
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        ids.add(slug)
    return ids


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"
    assert "make run" in "\n".join(lines[:8]) and "make test" in "\n".join(lines[:8]), "the two set-up commands come first"


def test_every_relative_link_resolves():
    broken, checked = [], 0
    for doc in DOCUMENTS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            checked += 1
            path, _, anchor = target.partition("#")
            where = (doc.parent / path).resolve() if path else doc
            if not where.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and where.suffix == ".md" and anchor not in anchors(where):
                broken.append(f"{doc.name}: {target} (no such anchor)")
    assert checked > 100 and not broken, broken


def test_the_code_cites_sections_that_the_method_specification_has():
    sections = set(re.findall(r'<a id="s(\d+)"', (ROOT / "docs" / "method.md").read_text()))
    cited = set()
    for path in [*ROOT.glob("*/*.py"), *ROOT.glob("configs/**/*.yaml")]:
        if ".venv" not in path.parts:
            cited |= set(re.findall(r"docs/method\.md §(\d+)", path.read_text()))
    assert cited and cited <= sections, f"cited but missing: {sorted(cited - sections)}"
