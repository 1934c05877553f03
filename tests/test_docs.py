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


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_the_slug_matches_githubs_anchors():
    assert _slug("LoRA and QLoRA: memory") == "lora-and-qlora-memory"
    assert _slug("The demo: a safety task with exact oracles") == (
        "the-demo-a-safety-task-with-exact-oracles"
    )
    assert _slug("### `bench/loss_head.py`".lstrip("# ")) == "benchloss_headpy"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_anchors_name_headings_of_their_page(page):
    problems = []
    for number, target in links(page.read_text(encoding="utf-8")):
        path, sep, anchor = target.partition("#")
        if not sep or not path.endswith(".md") and path:
            continue
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            continue  # reported by the test above
        headings = {
            _slug(line.lstrip("#"))
            for line in linked.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")
        }
        if anchor not in headings:
            problems.append(f"{page.relative_to(REPO)}:{number}: no heading for #{anchor}")
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_front_door():
    """At most about 250 lines: what and why, two commands, three screens, then links."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"
    text = "\n".join(lines[:40])
    assert "make demo" in text and "make test" in text, (
        "the two commands belong on the first screen"
    )
