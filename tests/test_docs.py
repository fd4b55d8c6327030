"""The documentation holds together: a short README, relative links that resolve, the promised docs pages.

Fast and Ray-free: it reads markdown files only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250
# The pages the README points a newcomer at; each must exist and be linked from the README.
PROMISED_PAGES = (
    "docs/configuration.md",
    "docs/objectives.md",
    "docs/data.md",
    "docs/clusters-and-storage.md",
    "docs/reliability.md",
    "docs/evaluation-and-comparison.md",
    "docs/performance.md",
    "docs/sweeps.md",
)
LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def relative_links(path: Path) -> list[str]:
    """The link and image targets of ``path`` outside fenced code blocks and inline code, without external URLs
    and pure anchors, with any ``#anchor`` cut off."""
    targets, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        prose = re.sub(r"`[^`]*`", "", line)
        for target in LINK.findall(prose):
            if EXTERNAL.match(target) or target.startswith("#"):
                continue
            targets.append(target.split("#", 1)[0])
    return targets


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    missing = [target for target in relative_links(path) if not (path.parent / target).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


def test_promised_pages_exist_and_are_linked() -> None:
    linked = {(README.parent / target).resolve() for target in relative_links(README)}
    for page in PROMISED_PAGES:
        assert (ROOT / page).is_file(), f"{page} is missing"
        assert (ROOT / page).resolve() in linked, f"README.md does not link {page}"


def test_link_finder_sees_links_and_skips_code(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("see [a](a.md#top) and [b](https://x.org) and [c](#here) and `[d](d.md)`\n"
                    "```\n[e](e.md)\n```\n![img](pic.png) [f](<sub/f.md>)\n", encoding="utf-8")
    assert relative_links(page) == ["a.md", "pic.png", "sub/f.md"]
