"""Every command in the README and docs/ parses as written, the cheap ones run, every local link resolves (issue 23).

Commands are taken from fenced code blocks (backslash continuations joined, split at ``&&``, ``;``, ``|``) and
from inline code spans, where they call the project's own entry points: ``python study/run.py``,
``python study/report.py``, ``python -m mriadv.<module>``, ``python benchmarks/<name>.py``,
``python docs/make_figures.py`` (or such a script path followed by options), and
``sbatch examples/slurm/study.sbatch``, whose options go to study/run.py unchanged. A span that is only a fragment
(``--seeds 3``) names no entry point and is skipped. Placeholders (``<id>``, ``$SHARED``, ``HEAD``, ``F``, ``RUN``)
become a dummy token for parsing; a command that has one is never run.

An entry point with a ``build_parser()`` is parsed in-process with ``parse_args``; one that builds its parser in
``main()`` (benchmarks/, docs/make_figures.py, mriadv.data.check) is run with ``--help`` and every ``--option`` the
doc uses must appear in that text.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "docs" / "results" / "README.md",
    *sorted((ROOT / "examples").glob("**/README.md")),
]
PYTHON = ("python", "python3")
SCRIPT = re.compile(r"(study|benchmarks|docs)/\w+\.py")
PLACEHOLDER = re.compile(r"<[^<>]+>|\$\{?\w+\}?|\b[A-Z][A-Z0-9_]*\b")
REPO_PATH = re.compile(r"(search_spaces|examples|benchmarks|docs|study|mriadv|tests)/[\w.*/-]+")
DUMMY = "1"  # parses as a path, a string, an int and a float
# Run as written, besides any --help: each was read to print and exit without data, training or Ray.
CHEAP = {("study/run.py", ("--list-spaces",)), ("mriadv.assess", ("--list-protocols",))}


@dataclass(frozen=True)
class Command:
    doc: str  # relative to the repository root
    line: int
    entry: str  # "study/run.py", "benchmarks/step_cost.py" or "mriadv.train"
    args: tuple[str, ...]  # placeholders replaced by DUMMY
    text: str  # the command as the doc writes it
    placeholders: bool
    runnable: bool  # starts with python: it can run as written
    paths: tuple[str, ...]  # repository files it names

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{self.entry}"

    @property
    def argv(self) -> list[str]:
        head = [self.entry] if "/" in self.entry else ["-m", self.entry]
        return [sys.executable, *head, *self.args]


def split_fences(text: str) -> tuple[list[tuple[int, str]], str]:
    """The lines inside fenced blocks, numbered, and the text with those blocks blanked (line numbers kept)."""
    fenced, prose, inside = [], [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
            prose.append("")
        elif inside:
            fenced.append((number, line))
            prose.append("")
        else:
            prose.append(line)
    return fenced, "\n".join(prose)


def snippets(text: str) -> list[tuple[int, str]]:
    """(line, shell text) of every fenced line, continuations joined, and of every inline code span."""
    fenced, prose = split_fences(text)
    out, start, parts = [], None, []
    for number, line in fenced:
        start = number if not parts else start
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        out.append((start, " ".join([*parts, line])))
        parts = []
    for m in re.finditer(r"`((?:[^`\n]|\n(?!\s*\n))+)`", prose):  # a span may wrap, but not across paragraphs
        out.append((prose.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


def shell_commands(snippet: str) -> list[list[str]]:
    lexer = shlex.shlex(snippet, posix=True, punctuation_chars="&;|")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: prose, not shell
        return []
    out, piece = [], []
    for token in [*tokens, ";"]:
        if set(token) <= set("&;|"):
            out += [piece] if piece else []
            piece = []
        else:
            piece.append(token)
    return out


def as_command(doc: str, line: int, tokens: list[str]) -> Command | None:
    python = tokens[0] in PYTHON
    rest = tokens[1:] if python else tokens
    if rest[:1] == ["-m"] and len(rest) > 1 and rest[1].startswith("mriadv."):
        entry, raw = rest[1], rest[2:]
    elif rest and SCRIPT.fullmatch(rest[0]) and (python or len(rest) > 1):
        entry, raw = rest[0], rest[1:]
    elif tokens[:2] == ["sbatch", "examples/slurm/study.sbatch"]:
        entry, raw = "study/run.py", tokens[2:]
    else:
        return None
    args = tuple(a if a.startswith("-") else PLACEHOLDER.sub(DUMMY, a) for a in raw)
    paths = [t for t in tokens if REPO_PATH.fullmatch(t)]
    if "/" not in entry:
        paths.append(entry.replace(".", "/") + ".py")
    for option, value in itertools.pairwise(raw):
        if option == "--space" and not PLACEHOLDER.search(value):
            paths.append(value if value.endswith((".yaml", ".yml")) else f"search_spaces/{value}.yaml")
    text = " ".join(tokens)
    return Command(doc, line, entry, args, text, args != tuple(raw), python, tuple(dict.fromkeys(paths)))


def extract(doc: Path) -> list[Command]:
    rel = doc.relative_to(ROOT).as_posix()
    found = []
    for line, snippet in snippets(doc.read_text(encoding="utf-8")):
        found += [c for tokens in shell_commands(snippet) if (c := as_command(rel, line, tokens))]
    return found


COMMANDS = [c for doc in DOCS for c in extract(doc)]
RUNNABLE = [
    c
    for c in COMMANDS
    if c.runnable and not c.placeholders and ((c.entry, c.args) in CHEAP or {"-h", "--help"} & set(c.args))
]


@functools.cache
def run(argv: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)


def build_parser(entry: str):
    """The entry point's own parser where its module has ``build_parser()``, else None."""
    module = entry.removesuffix(".py").replace("/", ".")
    if not module.startswith(("mriadv.", "study.")):  # benchmarks/ and docs/ scripts are not packages
        return None
    build = getattr(importlib.import_module(module), "build_parser", None)
    return build() if build else None


def test_docs_have_commands():
    assert len(COMMANDS) > 30, [c.id for c in COMMANDS]
    assert CHEAP <= {(c.entry, c.args) for c in RUNNABLE}, "a cheap command is gone from the docs, or not found"


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.id)
def test_command_parses(cmd: Command, capsys):
    parser = build_parser(cmd.entry)
    if parser is None:
        head = [cmd.entry] if "/" in cmd.entry else ["-m", cmd.entry]
        proc = run((sys.executable, *head, "--help"))
        assert proc.returncode == 0, f"{cmd.id}: {cmd.entry} --help failed:\n{proc.stderr[-2000:]}"
        options = [a.split("=")[0] for a in cmd.args if a.startswith("--")]
        missing = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", proc.stdout)]
        assert not missing, f"{cmd.id}: `{cmd.text}` uses {missing}, which `{cmd.entry} --help` does not list"
        return
    try:
        parser.parse_args(list(cmd.args))
    except SystemExit as exc:
        if exc.code:
            pytest.fail(f"{cmd.id}: `{cmd.text}` does not parse: {capsys.readouterr().err.strip()}")


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.id)
def test_command_paths_exist(cmd: Command):
    missing = [p for p in cmd.paths if not any(ROOT.glob(p))]
    assert not missing, f"{cmd.id}: `{cmd.text}` names {missing}, not in the repository"


@pytest.mark.parametrize("cmd", RUNNABLE, ids=lambda c: c.id)
def test_cheap_command_runs(cmd: Command):
    proc = run(tuple(cmd.argv))
    assert proc.returncode == 0, f"{cmd.id}: `{cmd.text}` exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip(), f"{cmd.id}: `{cmd.text}` printed nothing"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(doc: Path) -> set[str]:
    found, counts = set(), {}
    for line in split_fences(doc.read_text(encoding="utf-8"))[1].splitlines():
        if m := re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line):
            base = slug(m.group(1))
            found.add(f"{base}-{counts[base]}" if base in counts else base)  # GitHub numbers repeats: x, x-1, …
            counts[base] = counts.get(base, 0) + 1
    return found


def links() -> list:
    out = []
    for doc in DOCS:
        prose = split_fences(doc.read_text(encoding="utf-8"))[1]
        for m in re.finditer(r"!?\[[^\]]*\]\(([^()\s]+)\)", prose):
            target = m.group(1)
            if re.match(r"[a-zA-Z][\w+.-]*:", target):  # https:, mailto:
                continue
            line = prose.count("\n", 0, m.start()) + 1
            rel = doc.relative_to(ROOT).as_posix()
            out.append(pytest.param(doc, target, id=f"{rel}:{line}:{target}"))
    return out


LINKS = links()


def test_docs_have_links():
    assert len(LINKS) > 30


@pytest.mark.parametrize("doc, target", LINKS)
def test_link_resolves(doc: Path, target: str):
    path, _, anchor = unquote(target).partition("#")
    file = (doc.parent / path).resolve() if path else doc
    assert file.exists(), f"{doc.name}: link {target} points to {file}, which does not exist"
    if anchor:
        assert file.suffix == ".md", f"{doc.name}: link {target} has an anchor into a file that is not Markdown"
        assert anchor in anchors(file), f"{doc.name}: link {target}: no heading of {file.name} has that anchor"
