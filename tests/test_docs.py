"""The README and docs/ point only inside the repository, at files that exist."""

from __future__ import annotations

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
# [text](target) and ![alt](target); the target ends at the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def links(text: str) -> list[tuple[int, str]]:
    return [
        (number, match.group(1))
        for number, line in enumerate(text.splitlines(), 1)
        for match in LINK.finditer(line)
    ]


def test_the_link_pattern_finds_links_and_images():
    text = 'see [a](docs/a.md) and ![plot](x/y.png "title")\nnone here\n[b](#anchor)'
    assert links(text) == [(1, "docs/a.md"), (1, "x/y.png"), (3, "#anchor")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_stay_inside_the_repository_and_resolve(page):
    text = page.read_text(encoding="utf-8")
    problems = []
    for number, target in links(text):
        where = f"{page.relative_to(REPO)}:{number}: {target}"
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            problems.append(f"{where} (a link outside the repository)")
            continue
        path = target.split("#", 1)[0]
        if not path:
            continue  # an anchor on the same page
        resolved = (page.parent / path).resolve()
        if not resolved.is_relative_to(REPO):
            problems.append(f"{where} (leaves the repository)")
        elif not resolved.exists():
            problems.append(f"{where} (no such file)")
    # Team-internal paths written as text, not as links.
    for number, line in enumerate(text.splitlines(), 1):
        if "../shared/" in line:
            problems.append(f"{page.relative_to(REPO)}:{number}: mentions ../shared/")
    assert not problems, "\n".join(problems)
