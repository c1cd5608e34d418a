"""What a new user reads must work: every `nnunetv2_recokd` command line written in README.md and docs/ names a
subcommand and options that the command's own parser has, and every relative link points at a file (and heading) that
exists. `python -m nnunetv2_recokd` runs the same command as the console script."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nnunetv2_recokd.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 220  # issue #21: a short front page (about 200 lines); details belong in docs/

FENCE = re.compile(r"^ {0,3}(```|~~~)[^\n]*\n(.*?)^ {0,3}\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(?<!`)`([^`]+?)`(?!`)", re.S)
# the command, also as `python -m nnunetv2_recokd(.cli)`; not nnunetv2_recokd/ (a path) or nnunetv2_recokd.x (a module)
COMMAND = re.compile(r"(?<![\w./-])nnunetv2_recokd(?:\.cli)?(?=[ \t])")
OPTION = re.compile(r"^-{1,2}[A-Za-z][\w-]*")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _line(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def code_pieces(text: str) -> list[tuple[int, str]]:
    """(line, code) for every fenced block and every inline code span outside the blocks (a span's line breaks are
    spaces, as Markdown renders them)."""
    pieces = [(_line(text, m.start(2)), m.group(2)) for m in FENCE.finditer(text)]
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # blanked, so line numbers still hold
    pieces += [(_line(prose, m.start()), m.group(1).replace("\n", " ")) for m in INLINE_CODE.finditer(prose)
               if "\n\n" not in m.group(1)]  # a code span never crosses a paragraph
    return pieces


def prose_only(text: str) -> str:
    """The text with code blocks and code spans blanked (a link written inside code is code, not a link)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return INLINE_CODE.sub(lambda m: m.group(0) if "\n\n" in m.group(1) else "\n" * m.group(0).count("\n"), text)


def command_lines(code: str) -> list[tuple[int, list[str]]]:
    """(line offset, tokens after `nnunetv2_recokd`) for every command in a piece of code.

    Backslash continuations are joined; a command ends at the end of its line, at `;`, `&&`, `||`, a comment, or a
    `|` or `)` outside the square brackets that mark optional parts ([--runtime onnxruntime | --precision bf16])."""
    found = []
    for offset, line in zip(_physical_offsets(code), code.replace("\\\n", " ").split("\n")):
        for m in COMMAND.finditer(line):
            tokens, depth = [], 0
            for token in line[m.end():].split():
                if token in (";", "&&", "||") or token.startswith("#"):
                    break
                if depth == 0 and token.startswith(("|", ")")):
                    break
                depth += token.count("[") - token.count("]")
                tokens.append(token.strip("[]();"))
                if depth == 0 and (token.endswith(")") and "(" not in token or token.endswith(";")):
                    break  # the end of $(nnunetv2_recokd ...) or of a command before `;`
            found.append((offset, [t for t in tokens if t]))
    return found


def _physical_offsets(code: str) -> list[int]:
    """The physical line (0-based) on which each continuation-joined line starts."""
    offsets, physical = [0], 0
    for i, ch in enumerate(code):
        if ch == "\n":
            physical += 1
            if not code.startswith("\\\n", i - 1):
                offsets.append(physical)
    return offsets


def command_problems(text: str, parser: argparse.ArgumentParser, name: str = "") -> list[str]:
    """Every `nnunetv2_recokd <subcommand> ...` whose subcommand or options the parser does not have."""
    commands = subparsers(parser)
    problems = []
    for line, code in code_pieces(text):
        for offset, tokens in command_lines(code):
            where = f"{name}:{line + offset}"
            if not tokens or tokens[0] in ("...", "…") or OPTION.match(tokens[0]) and tokens[0] in \
                    parser._option_string_actions:
                continue  # `nnunetv2_recokd` alone, `nnunetv2_recokd ...` (any command), or --help
            sub = tokens[0]
            if sub not in commands:
                problems.append(f"{where}: `nnunetv2_recokd {sub}`: no such subcommand (has: {', '.join(commands)})")
                continue
            known = commands[sub]._option_string_actions
            for token in tokens[1:]:
                m = OPTION.match(token)
                if m and m.group(0) not in known:
                    problems.append(f"{where}: `nnunetv2_recokd {sub}` has no option {m.group(0)}")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but - and _ dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a linked heading anchors on its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for m in HEADING.finditer(FENCE.sub("", path.read_text())):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def link_problems(path: Path) -> list[str]:
    """Every relative link (inline, image or reference) whose file, or heading anchor in a Markdown file, is missing."""
    text = path.read_text()
    prose = prose_only(text)
    targets = [(m.start(), m.group(1)) for m in LINK.finditer(prose)]
    targets += [(m.start(), m.group(1)) for m in REFERENCE.finditer(prose)]
    problems = []
    for position, target in sorted(targets):
        if re.match(r"^[a-zA-Z][a-zA-Z+.-]*:", target):
            continue  # https:, mailto:: not ours to check offline
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.name}:{_line(prose, position)}"
        if not resolved.exists():
            problems.append(f"{where}: link {target!r}: {resolved} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: link {target!r}: {resolved.name} has no heading with anchor #{anchor}")
    return problems


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_written_in_the_docs_parses(path, parser):
    assert command_problems(path.read_text(), parser, str(path.relative_to(ROOT))) == []


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert link_problems(path) == []


def test_the_docs_do_write_commands_and_links(parser):
    """The checks above see something: the README's commands and links are found (a parser that finds nothing would
    pass every file)."""
    text = (ROOT / "README.md").read_text()
    subs = {tokens[0] for _, code in code_pieces(text) for _, tokens in command_lines(code) if tokens}
    assert {"install", "demo", "add-unlabeled", "predict", "export"} <= subs
    assert len(LINK.findall(prose_only(text))) >= 5


def test_the_checker_finds_unknown_subcommands_options_and_broken_links(tmp_path, parser):
    (tmp_path / "there.md").write_text("# Real heading\n")
    bad = tmp_path / "bad.md"
    bad.write_text(
        "Fine: `nnunetv2_recokd predict -i in -o out --disable_tta` and [ok](there.md#real-heading).\n\n"
        "```bash\n"
        "nnunetv2_recokd predict -i in -o out \\\n"
        "    --no-such-flag [-f 0 | --also-missing]   # --commented-out is no option\n"
        "nnunetv2_recokd frobnicate -x\n"
        "python -m nnunetv2_recokd.cli export -d 4 -q\n"
        "```\n\n"
        "Inline across a line: `nnunetv2_recokd add-unlabeled -i in\n--bogus`; a [broken](missing.md) and an "
        "[anchor](there.md#no-such-heading); [web](https://example.org) and `[code](nowhere.md)` are not checked.\n")
    problems = command_problems(bad.read_text(), parser, "bad.md")
    assert problems == [
        "bad.md:4: `nnunetv2_recokd predict` has no option --no-such-flag",
        "bad.md:4: `nnunetv2_recokd predict` has no option --also-missing",
        f"bad.md:6: `nnunetv2_recokd frobnicate`: no such subcommand (has: {', '.join(subparsers(parser))})",
        "bad.md:7: `nnunetv2_recokd export` has no option -q",
        "bad.md:10: `nnunetv2_recokd add-unlabeled` has no option --bogus",
    ]
    links = link_problems(bad)
    assert len(links) == 2
    assert "'missing.md'" in links[0] and "does not exist" in links[0]
    assert "#no-such-heading" in links[1]


def test_readme_is_a_short_front_page_with_ci_test_command():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, "README.md is the front page: move details into docs/"
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python -m pytest -q -n 2 tests"  # .ci/run runs the README's
    assert command in ci and command in text
    assert "-c constraints-cpu.txt" in ci and "-c constraints-cpu.txt" in text


def test_python_dash_m_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "nnunetv2_recokd", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: nnunetv2_recokd")
    for name in subparsers(build_parser()):
        assert name in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "nnunetv2_recokd", "no-such-command"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr  # argparse's exit status reaches the shell
