"""The docs cannot drift from the code: README.md and every docs/*.md page (whatever pages exist) are checked.

- docs/cli.md shows each command's `--help` exactly as `python -m core CMD --help` prints it (COLUMNS=100);
- the presets table lists every presets/*.yaml file, and nothing else;
- every `python -m core ...` line shown (code blocks and inline code) parses with the real parser;
- the README's "What is where" names every package of core/ and ui/;
- the README stays a newcomer's page (at most 180 lines) that links every docs page, and no local link is broken;
- repository paths named in the docs exist, and docs/architecture.md names only modules that exist.

Regenerate the help blocks of docs/cli.md after changing a command: `.venv/bin/python -m tests.test_docs --write`.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CLI_PAGE = ROOT / "docs" / "cli.md"
HELP_COLUMNS = "100"  # argparse wraps to the terminal's width: fixed, so the page is the same on every machine
BEGIN = "<!-- BEGIN generated help: do not edit by hand (python -m tests.test_docs --write) -->"
END = "<!-- END generated help -->"
REGENERATE = ".venv/bin/python -m tests.test_docs --write"
README_MAX_LINES = 180
CORE_CALL = re.compile(r"python3?\s+-m\s+core(?![\w.])")
SHELL_STOP = {"|", "||", "&&", ";", "&", ">", ">>", "<", "(", ")"}


def pages() -> list[Path]:
    return [README] + sorted((ROOT / "docs").glob("*.md"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------- CLI help

def command_names() -> list[str]:
    from core.__main__ import COMMANDS
    return list(COMMANDS)


def real_help(args: list[str]) -> str:
    """What `python -m core ARGS --help` prints at the docs' fixed width: the CLI's own parser, in this process
    (test_in_process_help_is_the_cli_output holds it to a real `python -m core ... --help`)."""
    from core.__main__ import build_parser
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS  # argparse reads the width from COLUMNS when it formats
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            build_parser().parse_args([*args, "--help"])
    except SystemExit as e:
        assert e.code in (0, None), f"python -m core {' '.join(args)} --help exited {e.code}"
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return out.getvalue()


def help_section() -> str:
    """docs/cli.md's generated part: the top-level help, then each command's."""
    parts = [BEGIN]
    for args in [[]] + [[name] for name in command_names()]:
        shown = " ".join(["python -m core", *args, "--help"])
        parts.append(f"\n### `{shown}`\n\n```text\n{real_help(args).rstrip()}\n```")
    parts.append(END)
    return "\n".join(parts)


def shown_help_section(text: str) -> str:
    assert BEGIN in text and END in text, (
        f"docs/cli.md lost its generated help markers; put these two lines back and run {REGENERATE}:\n{BEGIN}\n{END}")
    return text[text.index(BEGIN):text.index(END) + len(END)]


def write_help() -> None:
    text = CLI_PAGE.read_text()
    CLI_PAGE.write_text(text.replace(shown_help_section(text), help_section()))


def test_cli_page_shows_the_real_help():
    shown = shown_help_section(CLI_PAGE.read_text())
    real = help_section()
    diff = "\n".join(difflib.unified_diff(shown.splitlines(), real.splitlines(), "docs/cli.md", "--help", lineterm=""))
    assert shown == real, f"docs/cli.md's help differs from `python -m core CMD --help`; run {REGENERATE}\n{diff}"


def test_in_process_help_is_the_cli_output():
    for args in ([], ["export"]):
        cli = subprocess.run([sys.executable, "-m", "core", *args, "--help"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "COLUMNS": HELP_COLUMNS})
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout == real_help(args)


# ---------------------------------------------------------------- presets table

def preset_tables() -> dict[str, list[str]]:
    """Every markdown table whose first header cell is `preset`: page -> the names in its first column."""
    found = {}
    for page in pages():
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.lstrip().startswith("|") or cells[0].lower() != "preset":
                continue
            names = []
            for row in lines[i + 2:]:
                if not row.lstrip().startswith("|"):
                    break
                names.append(row.strip().strip("|").split("|")[0].strip().strip("`"))
            found[_rel(page)] = names
    return found


def test_presets_table_lists_every_preset_file():
    files = sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))
    tables = preset_tables()
    assert len(tables) == 1, f"expected one presets table (first column `preset`) in README.md or docs/, found {tables}"
    (page, names), = tables.items()
    missing = [f for f in files if f not in names]
    extra = [n for n in names if n not in files]
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not missing, (f"presets/{missing[0]}.yaml has no row in the presets table of {page} "
                         f"(missing: {', '.join(missing)}): add a row saying who it is for, model size, method, "
                         "trade-offs")
    assert not extra, f"the presets table of {page} lists {', '.join(extra)}, which has no file in presets/"
    assert not dupes, f"the presets table of {page} lists {', '.join(dupes)} twice"


# ---------------------------------------------------------------- every `python -m core ...` shown parses

def _join_continued(lines: list[str]) -> list[str]:
    out, buf = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append(buf + line)
        buf = ""
    if buf:
        out.append(buf)
    return out


def shown_commands(text: str) -> list[str]:
    """The `python -m core ...` commands of a markdown page: in fenced or indented code blocks (a trailing
    backslash continues a line) and in inline code spans."""
    code, prose, fence = [], [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            if fence is None:
                fence = stripped[:3]
            elif stripped.startswith(fence):
                fence = None
            continue
        if fence is not None or (line.startswith("    ") and "`" not in line):
            code.append(line)
        else:
            prose.append(line)
    commands = [line for line in _join_continued(code) if CORE_CALL.search(line)]
    for span in re.findall(r"`([^`]+)`", "\n".join(prose)):
        if CORE_CALL.search(span):
            commands.append(" ".join(span.split()))
    return [line[CORE_CALL.search(line).start():].strip() for line in commands]


def argv_of(command: str) -> list[str]:
    """The arguments after `python -m core`, up to a shell operator; a `#` comment is dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = []
    for token in lexer:
        if token in SHELL_STOP:
            break
        tokens.append(token)
    return tokens[3:]


def parse_error(argv: list[str]) -> str | None:
    """None when the real parser takes argv (parse only: nothing runs), else what argparse said."""
    from core.__main__ import build_parser
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            if e.code not in (0, None):  # --help exits 0
                return err.getvalue().strip() or f"exit {e.code}"
    return None


def without_generated_help(text: str) -> str:
    """The page less its generated help blocks: their usage lines are syntax, not commands to type."""
    if BEGIN in text and END in text:
        return text[:text.index(BEGIN)] + text[text.index(END) + len(END):]
    return text


def test_every_core_command_shown_parses():
    checked, bad = 0, []
    for page in pages():
        for command in shown_commands(without_generated_help(page.read_text())):
            checked += 1
            problem = parse_error(argv_of(command))
            if problem:
                bad.append(f"{_rel(page)}: {command}\n    {problem.splitlines()[-1]}")
    assert checked >= 20, f"only {checked} `python -m core` commands found in README.md and docs/: is the extractor broken?"
    assert not bad, "commands shown in the docs that `python -m core` refuses:\n" + "\n".join(bad)


def test_extractor_finds_continued_inline_and_refused_commands():
    text = ("Run `python -m core runs\nshow RUN` then:\n\n```bash\npython -m core estimate --model M \\\n"
            "    --gpus 2   # per GPU\n.venv/bin/python -m core data f.jsonl | head\n```\n\n"
            "    python -m core train --no-such-flag\n")
    found = shown_commands(text)
    assert found == ["python -m core estimate --model M      --gpus 2   # per GPU",
                     "python -m core data f.jsonl | head",
                     "python -m core train --no-such-flag",
                     "python -m core runs show RUN"], found
    assert [argv_of(c) for c in found[:2]] == [["estimate", "--model", "M", "--gpus", "2"], ["data", "f.jsonl"]]
    assert parse_error(argv_of(found[0])) is None
    assert "unrecognized arguments: --no-such-flag" in parse_error(argv_of(found[2]))


# ---------------------------------------------------------------- the README: what is where, length, links

def readme_section(title: str) -> str:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def test_what_is_where_names_every_package():
    section = readme_section("What is where")
    packages = sorted(f"core/{p.parent.name}/" for p in (ROOT / "core").glob("*/__init__.py")) + ["ui/"]
    missing = [p for p in packages if f"`{p}" not in section]
    assert not missing, (f"README.md's 'What is where' does not name {', '.join(missing)}: add a row saying what "
                         "the package is for (its __init__.py docstring says it in a line)")


def test_readme_is_a_short_page():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, (f"README.md has {n} lines (at most {README_MAX_LINES}): move reference material "
                                   "to a page under docs/ and link it")


def test_every_docs_page_is_linked_from_the_readme():
    linked = set(re.findall(r"\]\((docs/[^)#\s]+\.md)", README.read_text()))
    pages_there = {_rel(p) for p in sorted((ROOT / "docs").glob("*.md"))}
    missing = sorted(pages_there - linked)
    assert not missing, (f"README.md does not link {', '.join(missing)}: add a line to its '## Docs' list, "
                         f"e.g. - [Title]({missing[0]}): what the page covers")


def test_local_links_resolve():
    broken = []
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor on the same page
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{_rel(page)} -> {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


REPO_PATH = re.compile(r"(?<![\w/.$~<-])((?:core|ui|tests|bench|presets|docs)(?:/[\w.*<>-]*)+)")


def test_repo_paths_named_in_the_docs_exist():
    """core/estimate/constants.py, tests/helpers/tiny.py, bench/results/x.*: a moved file leaves no stale path
    (a path with a <placeholder> is a pattern, not a file)."""
    stale = []
    for page in pages():
        for match in REPO_PATH.finditer(page.read_text()):
            path = match.group(1).rstrip(".,:;")
            if "<" not in path and not list(ROOT.glob(path.rstrip("/") or ".")):
                stale.append(f"{_rel(page)}: {path}")
    assert not stale, "paths named in the docs that are not in the repository:\n" + "\n".join(stale)


def test_architecture_names_only_modules_that_exist():
    """In docs/architecture.md, each `name.py` under a '## core/PKG/' heading is a module of that package, and
    under the shared base's heading a module at core/'s top."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing, checked = [], 0
    for heading, body in re.findall(r"^## ([^\n]*)\n(.*?)(?=^## |\Z)", text, re.M | re.S):
        package = re.search(r"core/(\w+)/", heading)
        folder = ROOT / "core" / package.group(1) if package else ROOT / "core" if "core/ top" in heading else None
        if folder is None:
            continue
        for name in re.findall(r"`(\w+\.py)`", body):
            checked += 1
            if not (folder / name).is_file():
                missing.append(f"{name} under '## {heading}' (no {_rel(folder / name)})")
    assert checked >= 30, f"only {checked} module names found in docs/architecture.md: did its headings change?"
    assert not missing, "docs/architecture.md names modules that do not exist:\n" + "\n".join(missing)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {REGENERATE}   (rewrites the generated help blocks of docs/cli.md)")
    write_help()
    print(f"wrote {_rel(CLI_PAGE)}")
