"""The README stays a user's page and the docs stay free of development history.

Checks, in milliseconds: the README's size; its first fenced block is the two quick-start commands;
every relative link in the README and in docs/ points at a file that exists (and, for a link with
a #fragment into a Markdown file, at a heading that exists); no page tells the project's history.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("**/*.md"))
PAGES = [README, *DOCS]

MAX_README_BYTES = 16000
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HISTORY = re.compile(r"previous version|this session|sessions since|\bissue #?\d", re.I)


def _prose(text: str) -> str:
    """The page without its fenced blocks (links and headings inside code are not links)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _prose(page.read_text()), re.M)}


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; keep it under {MAX_README_BYTES} (depth goes to docs/)"


def test_quick_start_comes_first():
    first = FENCE.search(README.read_text())
    assert first is not None, "README.md has no fenced block"
    assert first.group(1).strip().splitlines() == ["make demo", "make test"]


def test_docs_exist():
    assert DOCS, "docs/ holds no Markdown page"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_relative_links_exist(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert not broken, f"{_id(page)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_no_development_history(page):
    hits = [f"line {page.read_text()[:m.start()].count(chr(10)) + 1}: {m.group(0)!r}"
            for m in HISTORY.finditer(page.read_text())]
    assert not hits, f"{_id(page)} tells the project's history (say what is measured, on what, at which git sha): {hits}"
