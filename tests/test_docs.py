"""README and docs/: every relative link resolves (file and #anchor), README stays a first page."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set:
    lines = page.read_text().split("\n")
    fenced, out = False, set()
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.add(github_anchor(line.lstrip("#")))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if ROOT in dest.parents else dest})")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {dest.name})")
    assert not broken, f"{page.name}: broken links: " + "; ".join(broken)


def test_readme_is_a_first_page():
    text = (ROOT / "README.md").read_text()
    lines = text.split("\n")
    assert len(lines) <= 160, f"README.md has {len(lines)} lines; move depth into docs/"
    # .ci/run reads the test command from this exact line format.
    assert sum(line.startswith("TEST_COMMAND: `") for line in lines) == 1
    first_block = text.index("```bash")
    assert "drople-fast demo" in text[first_block:text.index("```", first_block + 7)]


def test_github_anchor_rule():
    assert github_anchor(" Patching an open_clip model") == "patching-an-open_clip-model"
    assert github_anchor(" Release vs `drople_fast` defaults") == "release-vs-drople_fast-defaults"
