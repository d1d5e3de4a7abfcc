"""Every link the docs and `--help` cite resolves: the file exists and, for `#anchor`, a heading
of that file has it (GitHub's slugs: lowercase, punctuation dropped, spaces to hyphens, -1, -2
for repeats)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO
from wikigpt.cli import COMMANDS, make_parser

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITED = re.compile(r"(?<![\w/])((?:docs/)?[\w-]+\.md)(#[\w-]+)?")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def check(target: str, base: Path) -> str | None:
    """None if `target` (a relative path, maybe with #anchor) resolves from `base`'s folder."""
    path, _, anchor = target.partition("#")
    page = (base.parent / path).resolve() if path else base
    if not page.exists():
        return f"{target}: no such file"
    if anchor and page.suffix == ".md" and anchor not in anchors(page):
        return f"{target}: {page.name} has no heading #{anchor}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_of_the_docs_resolves(page):
    bad = []
    for target in LINK.findall(re.sub(r"```.*?```", "", page.read_text(), flags=re.S)):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check offline
            continue
        if (problem := check(target, page)) is not None:
            bad.append(problem)
    assert not bad, f"{page.name}: " + "; ".join(bad)


def test_every_page_that_help_cites_resolves():
    parser = make_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    texts = [sub.choices[name].format_help() for name in COMMANDS]
    cited = {m.group(1) + (m.group(2) or "") for text in texts for m in CITED.finditer(text.replace("\n", " "))}
    assert cited, "no page cited: the pattern is broken"
    bad = [p for c in sorted(cited) if (p := check(c if c.startswith("docs/") or c == "README.md" else f"docs/{c}",
                                                    REPO / "README.md")) is not None]
    assert not bad, "; ".join(bad)
