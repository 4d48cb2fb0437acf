"""Every code block of README.md works as written.

- ```python blocks: each must define or import every name it uses (checked statically first, so the failure names the
  missing names), then runs as written in a fresh process, in an empty folder, on whatever model the block itself
  builds or loads (the README keeps its examples on tiny or offline models so that this runs in seconds).
- ```bash blocks (and inline `hf-prune ...` spans in the prose): every `hf-prune ...` command line parses with the
  CLI's own parser; every `python recipes/...` / `accelerate launch recipes/...` script and its `--config` exist.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK_TIMEOUT_S = 900  # one block, a fresh process on 2 CPU cores (about 1 minute idle; generous for a loaded machine)


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # line of the opening fence, 1-based
    code: str


def readme_blocks(text: str) -> list[Block]:
    blocks, lang, start, lines = [], None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if fence and lang is None:
            lang, start, lines = fence.group(1).lower() or "text", i, []
        elif fence and line.strip() == "```":
            blocks.append(Block(lang, start, "\n".join(lines) + "\n"))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, f"README.md: the code block opened at line {start} is never closed"
    return blocks


BLOCKS = readme_blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b.lang in ("python", "py")]
BASH = [b for b in BLOCKS if b.lang in ("bash", "sh", "shell", "console")]


def _prose_commands(text: str) -> list[tuple[int, str]]:
    """Inline `hf-prune ...` spans outside code blocks (a span may wrap onto the next line), with their line."""
    prose, in_block = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
            prose.append("")
        else:
            prose.append("" if in_block else line)
    joined = "\n".join(prose)
    return [(joined.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
            for m in re.finditer(r"`(hf-prune\s[^`]+)`", joined)]


def undefined_names(code: str) -> list[str]:
    """Names a block reads but never binds (by assignment, import, def, class, argument, loop or with target)."""
    tree = ast.parse(code)
    bound, used = set(dir(builtins)), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                used.setdefault(node.id, node.lineno)
            else:
                bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
    return sorted(set(used) - bound, key=used.get)


def test_readme_has_code_blocks():
    assert PYTHON, "README.md has no ```python block"
    assert BASH, "README.md has no ```bash block"


@pytest.mark.parametrize("block", PYTHON, ids=[f"python-line-{b.line}" for b in PYTHON])
def test_python_block_runs_as_written(block, tmp_path):
    missing = undefined_names(block.code)
    assert not missing, (f"README.md line {block.line}: the block uses {', '.join(missing)} without defining or "
                         f"importing it")
    env = {**os.environ, "HF_PRUNE_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    script = tmp_path / f"readme_line_{block.line}.py"
    script.write_text(block.code)
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)
    assert proc.returncode == 0, f"README.md line {block.line} failed:\n{proc.stderr[-4000:]}"


def _command_lines(code: str) -> list[list[str]]:
    """Each command of a shell block as argv: continuations joined, comments dropped, split at && ; |."""
    text = code.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        argv: list[str] = []
        for token in lexer:
            if set(token) <= set(";&|"):
                if argv:
                    commands.append(argv)
                argv = []
            else:
                argv.append(token)
        if argv:
            commands.append(argv)
    return [c[1:] if c[0] == "$" else c for c in commands]


def _parse_hf_prune(argv: list[str], where: str, tmp_path: Path, capsys) -> None:
    """The CLI's parser accepts the line. A path argument that names a folder the README's earlier steps would create
    (an export folder, a text file) is created here, empty, so that only the syntax is checked."""
    from hf_prune import cli

    kwargs = {"method_options": True} if "method_options" in inspect.signature(cli.build_parser).parameters else {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for _ in range(8):  # each round may create one missing path the line names
            try:
                cli.build_parser(**kwargs).parse_args(argv[1:])
                return
            except SystemExit as e:
                err = capsys.readouterr().err
                missing = re.search(r"(file|folder) '([^']+)' (does not exist|has no config.json)", err)
                if e.code == 0 or missing is None:
                    assert e.code == 0, f"{where}: `{shlex.join(argv)}` does not parse:\n{err}"
                    return
                path = tmp_path / missing.group(2)
                if missing.group(1) == "file":
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "config.json").write_text("{}")
        pytest.fail(f"{where}: `{shlex.join(argv)}` still names missing paths after 8 rounds")
    finally:
        os.chdir(cwd)


def _check_script(argv: list[str], where: str) -> None:
    script = next(a for a in argv if a.endswith(".py"))
    assert (REPO / script).is_file(), f"{where}: {script} does not exist"
    for flag in ("--config", "--config_file"):
        if flag in argv:
            config = argv[argv.index(flag) + 1]
            assert (REPO / config).is_file(), f"{where}: {flag} {config} does not exist"


@pytest.mark.parametrize("block", BASH, ids=[f"bash-line-{b.line}" for b in BASH])
def test_bash_block_commands_exist_and_parse(block, tmp_path, capsys):
    commands = _command_lines(block.code)
    assert commands, f"README.md line {block.line}: empty shell block"
    for argv in commands:
        where = f"README.md block at line {block.line}"
        if argv[0] == "hf-prune":
            _parse_hf_prune(argv, where, tmp_path, capsys)
        elif any(a.startswith("recipes/") and a.endswith(".py") for a in argv):
            _check_script(argv, where)


@pytest.mark.parametrize("line,command", _prose_commands(README.read_text()) or [pytest.param(0, "", marks=pytest.mark.skip(
    reason="README.md has no inline `hf-prune ...` span"))])
def test_inline_hf_prune_commands_parse(line, command, tmp_path, capsys):
    _parse_hf_prune(shlex.split(command), f"README.md line {line}", tmp_path, capsys)


def test_readers_can_fail(tmp_path, capsys):
    """The helpers above find what they must find (so that a passing test means something)."""
    with pytest.raises(AssertionError, match="does not parse"):
        _parse_hf_prune(["hf-prune", "prune", "--no-such-flag"], "here", tmp_path, capsys)
    with pytest.raises(AssertionError, match="does not exist"):
        _check_script(["python", "recipes/no_such_recipe.py"], "here")
    assert undefined_names("from x import a\nb = a(c)\nfor i in b: print(i, d)\n") == ["c", "d"]
    assert undefined_names("import os.path\ndef f(x, *, y=1):\n    return os.path.join(x, y)\n") == []
    blocks = readme_blocks("t\n```python\nx = 1\n```\n```bash\nls\n```\n")
    assert [(b.lang, b.line, b.code) for b in blocks] == [("python", 2, "x = 1\n"), ("bash", 5, "ls\n")]
    assert _command_lines("pip install -e '.[test]' && python a.py --x 1   # [main]\nhf-prune methods \\\n  -v\n") == [
        ["pip", "install", "-e", ".[test]"], ["python", "a.py", "--x", "1"], ["hf-prune", "methods", "-v"]]
