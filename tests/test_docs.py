"""The documentation stays true: every public name documented, the library page's snippets run, every CLI flag
described, every relative link and anchor resolves, and no internal reference leaks into user-facing text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import kronfisher as kf
from kronfisher.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LIBRARY = DOCS / "library.md"

# User-facing text: the internal math reference and predecessor bug numbers mean nothing to users.
USER_FACING = [
    ROOT / "README.md",
    ROOT / "Makefile",
    *DOCS.glob("*.md"),
    *(ROOT / "examples").glob("*.py"),
    *(p for p in (ROOT / "src").rglob("*") if p.suffix in (".py", ".txt", ".md")),  # docstrings, messages, reports
    ROOT / "CHANGELOG.md",
    *(p for p in (ROOT / "benchmarks").glob("*") if p.suffix in (".py", ".md")),  # what users run and read
]
FORBIDDEN = [re.compile(r"\bSPEC\b"), re.compile(r"seed bug", re.IGNORECASE)]


def test_every_public_name_is_documented_in_library_md() -> None:
    text = LIBRARY.read_text()
    headings = {m.strip("` ") for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    code = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", text))
    missing = [name for name in kf.__all__ if name not in headings and name not in code]
    assert not missing, f"document these names of kronfisher.__all__ in docs/library.md: {missing}"


def test_library_md_snippets_run_and_their_assertions_hold() -> None:
    blocks = re.findall(r"```python\n(.*?)```", LIBRARY.read_text(), flags=re.S)
    assert len(blocks) >= 20, "docs/library.md lost its snippets"
    namespace: dict = {}
    for i, block in enumerate(blocks):  # in order, one namespace: the page is one script
        exec(compile(block, f"{LIBRARY}[block {i}]", "exec"), namespace)


def test_every_cli_flag_is_described_in_cli_md() -> None:
    text = (DOCS / "cli.md").read_text()
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    missing = []
    for command, sub in commands.items():
        assert f"kronfisher {command}" in text, command
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help" and not re.search(rf"(?<![\w-]){flag}(?![\w-])", text):
                    missing.append(f"{command} {flag}")
    assert not missing, f"describe these flags in docs/cli.md: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_no_internal_references_in_user_facing_text() -> None:
    hits = []
    for path in USER_FACING:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in FORBIDDEN):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "cite docs/ or a paper instead:\n" + "\n".join(hits)
