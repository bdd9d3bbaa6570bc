"""The README and docs/*.md: every relative link and anchor resolves, the README stays an
introduction (at most 200 lines, the Quickstart's two commands first), and no issue numbers.

Plain text checks: no network, no prunecxr import, no conftest fixture."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 200
QUICKSTART_COMMANDS = ["bash ci/demo.sh", "bash ci/test.sh"]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
# [text](target) and ![alt](target), optionally with a "title"; text may span lines.
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
ISSUE_REFERENCE = re.compile(r"(?<![\w&])#\d+\b")


def documents() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The file's lines with fenced code blocks blanked (so line numbers stay right)."""
    lines, fence = [], ""
    for line in text.splitlines():
        marker = FENCE.match(line)
        if not fence:
            if marker:
                fence = marker.group(1)
            lines.append("" if fence else line)
            continue
        if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence):
            if not line.strip().strip(fence[0]):  # a closing fence has no info string
                fence = ""
        lines.append("")
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, drop what is not a letter, digit, space,
    hyphen or underscore, spaces to hyphens ("The demo's findings" -> "the-demos-findings")."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file defines: heading slugs (repeats get -1, -2, … as on
    GitHub) and explicit <a name=…>/<a id=…>."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    lines = prose_lines(path.read_text(encoding="utf-8"))
    for line in lines:
        heading = HEADING.match(line)
        if heading:
            slug = github_slug(heading.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    found.update(HTML_ANCHOR.findall("\n".join(lines)))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link outside code blocks and code spans."""
    text = "\n".join(prose_lines(path.read_text(encoding="utf-8")))
    # Blank out code spans but keep their length and newlines, so line numbers stay right.
    text = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", "x", m.group(0)), text)
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in LINK.finditer(text)]


def broken_links() -> list[str]:
    problems = []
    for document in documents():
        for line, target in links(document):
            where = f"{document.relative_to(ROOT)}:{line}: ({target})"
            if not target:
                problems.append(f"{where}: empty link target")
                continue
            if SCHEME.match(target):
                continue  # http(s), mailto, …: not checked here
            path_part, _, anchor = target.partition("#")
            path_part = unquote(path_part)
            if not path_part:
                linked = document
            elif path_part.startswith("/"):
                linked = ROOT / path_part.lstrip("/")
            else:
                linked = document.parent / path_part
            if not linked.exists():
                problems.append(f"{where}: {os.path.relpath(linked, ROOT)} does not exist")
                continue
            if anchor and linked.suffix.lower() == ".md" and linked.is_file():
                if unquote(anchor).lower() not in anchors(linked):
                    problems.append(
                        f"{where}: no heading in {os.path.relpath(linked, ROOT)} "
                        f"has the anchor #{anchor}"
                    )
    return problems


def test_github_slug_examples():
    assert github_slug("The demo's findings") == "the-demos-findings"
    assert github_slug("MLflow Projects (`mlflow run`)") == "mlflow-projects-mlflow-run"
    assert github_slug("Checkpoints and `--resume`") == "checkpoints-and---resume"
    assert github_slug("One model on several GPUs (DDP)") == "one-model-on-several-gpus-ddp"


def test_the_docs_exist():
    assert (ROOT / "docs").is_dir()
    assert len(documents()) > 1


def test_every_relative_link_and_anchor_resolves():
    problems = broken_links()
    assert not problems, f"{len(problems)} broken link(s):\n" + "\n".join(problems)


def test_readme_is_an_introduction():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines, at most {MAX_README_LINES}: "
        "move detail into docs/ and link it"
    )


def test_readme_quickstart_has_exactly_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert "## Quickstart" in lines, "README.md has no '## Quickstart' section"
    start = lines.index("## Quickstart") + 1
    end = next(
        (i for i in range(start, len(lines)) if re.match(r"^#{1,2}\s", lines[i])), len(lines)
    )
    section = lines[start:end]
    fences = [i for i, line in enumerate(section) if FENCE.match(line)]
    assert len(fences) >= 2, "the Quickstart section has no fenced code block"
    block = section[fences[0] + 1 : fences[1]]
    commands = [line.split("#", 1)[0].strip() for line in block]
    commands = [command for command in commands if command]
    assert commands == QUICKSTART_COMMANDS, (
        f"the Quickstart's first code block runs {commands}, not {QUICKSTART_COMMANDS}"
    )


def test_readme_starts_with_title_intro_then_quickstart():
    blocks = [b for b in README.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    assert blocks[0].startswith("# "), "README.md must start with its title"
    assert blocks[2].startswith("## Quickstart"), (
        "the Quickstart must follow the title and one intro paragraph"
    )


def test_no_issue_references():
    found = []
    for document in documents():
        for number, line in enumerate(prose_lines(document.read_text(encoding="utf-8")), 1):
            for match in ISSUE_REFERENCE.finditer(line):
                found.append(f"{document.relative_to(ROOT)}:{number}: {match.group(0)}")
    assert not found, "issue references in the docs (say what, not which issue):\n" + "\n".join(
        found
    )
