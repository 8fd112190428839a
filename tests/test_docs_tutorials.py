"""The code blocks of the tutorials (docs/tutorials/*.rst) and of the other pages with code run as written.

Convention for the code blocks of the tutorial pages:

- ``.. code-block:: python`` blocks are executed in page order, all blocks of a page in one namespace.
- ``.. code-block:: bash`` blocks are executed command by command: every command starts with
  ``tokencomp`` and runs in-process through typer's ``CliRunner`` on ``tokencomp.cli.app`` (the words
  split with ``shlex``, ``#`` comments allowed, a line ending in a backslash continues on the next); it
  must exit with code 0. Any other command in an executed bash block is an error.
- A python or bash block with the option ``:class: no-run`` is displayed but not executed (a real
  checkpoint, the four-minute default ablation). Sphinx accepts the option: it only adds an HTML class.
- Blocks in any other language (``text``, ``toml``, ...) are displayed only.
- ``::`` literal blocks are not allowed on these pages: code in them would go unchecked.

Each page runs in a fresh temporary working directory (files it writes land there), and the strategies
its blocks register are unregistered afterwards, so the rest of the suite sees the bundled registry.
A failure names the page, the block's number on the page and its line; tracebacks point at the line of
the ``.rst`` file.
"""

from __future__ import annotations

import re
import shlex
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tokencomp as tc
from tokencomp import registry
from tokencomp.cli import app

DOCS = Path(__file__).resolve().parent.parent / "docs"
TUTORIALS = ("tutorials/own-strategy", "tutorials/ablation", "tutorials/huggingface")
# the other pages with code: their python blocks run too (their shell blocks are marked no-run)
PAGES = TUTORIALS + ("getting-started", "concepts", "apet", "scenes")
SHELL_LANGUAGES = ("bash", "console", "shell", "sh")

_DIRECTIVE = re.compile(r"^(?P<indent> *)\.\. (?:code-block|code|sourcecode)::[ \t]*(?P<language>\S*)[ \t]*$")
_OPTION = re.compile(r"^ *:(?P<name>[\w-]+):[ \t]*(?P<value>.*)$")


@dataclass
class Block:
    """A code block of a page: its language, dedented code, 1-based line of the directive and of the
    code's first line, and whether it is executed."""

    language: str
    code: str
    line: int
    first_code_line: int
    run: bool

    @property
    def executed(self) -> bool:
        return self.run and (self.language == "python" or self.language in SHELL_LANGUAGES)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def code_blocks(text: str) -> list[Block]:
    """Every ``code-block`` directive of an ``.rst`` text, in order (see the module docstring)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, line = len(match["indent"]), i + 1
        i += 1
        options: dict[str, str] = {}
        while i < len(lines) and _indent(lines[i]) > indent and (option := _OPTION.match(lines[i])):
            options[option["name"]] = option["value"].strip()
            i += 1
        body_start = i
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
            i += 1
        body = lines[body_start:i]
        leading = next((k for k, b in enumerate(body) if b.strip()), len(body))
        code = textwrap.dedent("\n".join(body[leading:])).strip("\n") + "\n"
        run = "no-run" not in options.get("class", "").split()
        blocks.append(Block(match["language"], code, line, body_start + leading + 1, run))
    return blocks


def literal_blocks(text: str) -> list[int]:
    """1-based lines that open a ``::`` literal block (a paragraph ending in ``::``, not a directive)."""
    return [
        n
        for n, line in enumerate(text.splitlines(), 1)
        if line.rstrip().endswith("::") and not line.lstrip().startswith("..")
    ]


def commands(block: Block) -> list[list[str]]:
    """The ``tokencomp`` commands of a shell block, each as its arguments after ``tokencomp``.

    Raises
    ------
    ValueError
        A command that is not ``tokencomp``.
    """
    found = []
    for line in block.code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] != "tokencomp":
            raise ValueError(
                f"line {line!r}: executed shell blocks may only run `tokencomp ...`; "
                "mark the block `:class: no-run` to show it without running it"
            )
        found.append(words[1:])
    return found


# ---------------------------------------------------------------------------- the convention itself
SAMPLE = """\
Title
=====

.. code-block:: python

   x = 1

     y = 2  # still the block

Text.

.. code-block:: python
   :class: no-run
   :caption: not run

   download()

.. code-block:: bash

   tokencomp ls   # a comment
   tokencomp ablate --out "a b" \\
       --no-vlm

.. code-block:: toml

   a = 1

- item

  .. code-block:: python

     z = 3
"""


def test_code_blocks_are_read_as_the_convention_says():
    blocks = code_blocks(SAMPLE)
    assert [(b.language, b.line, b.first_code_line, b.run, b.executed) for b in blocks] == [
        ("python", 4, 6, True, True),
        ("python", 12, 16, False, False),
        ("bash", 18, 20, True, True),
        ("toml", 24, 26, True, False),
        ("python", 30, 32, True, True),
    ]
    assert blocks[0].code == "x = 1\n\n  y = 2  # still the block\n"
    assert blocks[4].code == "z = 3\n"
    assert commands(blocks[2]) == [["ls"], ["ablate", "--out", "a b", "--no-vlm"]]
    with pytest.raises(ValueError, match="only run `tokencomp"):
        commands(Block("bash", "pip install tokencomp\n", 1, 2, True))
    assert literal_blocks("Run it::\n\n   x\n\n.. note::\n") == [1]


# ---------------------------------------------------------------------------- the pages
runner = CliRunner()


@pytest.fixture
def bundled_registry():
    """Unregister, after the test, whatever strategies it registered."""
    tc.available()  # load the bundled strategies and entry points first
    saved = dict(registry._registry)
    yield
    registry._registry.clear()
    registry._registry.update(saved)


def _run_python(page: Path, number: int, block: Block, namespace: dict) -> None:
    # padded so that line numbers in tracebacks are the .rst file's
    source = "\n" * (block.first_code_line - 1) + block.code
    failure = None
    try:
        exec(compile(source, str(page), "exec"), namespace)
    except Exception as exc:  # noqa: BLE001 - any error fails the page, reported with its block
        failure = (
            f"docs/{page.relative_to(DOCS)}: code block {number} (python, line {block.line}) raised "
            f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}"
        )
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def _run_shell(page: Path, number: int, block: Block) -> None:
    where = f"docs/{page.relative_to(DOCS)}: code block {number} ({block.language}, line {block.line})"
    try:
        found = commands(block)
    except ValueError as exc:
        found, failure = [], f"{where}: {exc}"
    else:
        failure = None
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    for args in found:
        result = runner.invoke(app, args)
        if result.exit_code != 0:
            detail = ""
            if result.exc_info is not None and not isinstance(result.exception, SystemExit):
                detail = "\n" + "".join(traceback.format_exception(*result.exc_info))
            pytest.fail(
                f"{where}: `tokencomp {shlex.join(args)}` exited with {result.exit_code}:\n{result.output}{detail}",
                pytrace=False,
            )


@pytest.mark.parametrize("name", PAGES)
def test_tutorial_code_runs(name, tmp_path, monkeypatch, bundled_registry):
    page = DOCS / f"{name}.rst"
    text = page.read_text()
    assert not literal_blocks(text), f"{page.name}: `::` literal blocks at lines {literal_blocks(text)}; use code-block"
    blocks = code_blocks(text)
    if name in TUTORIALS:
        assert sum(b.executed for b in blocks) >= 3, f"{page.name}: fewer than 3 executed code blocks"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_" + re.sub(r"\W", "_", name)}
    for number, block in enumerate(blocks, 1):
        if not block.executed:
            continue
        if block.language == "python":
            _run_python(page, number, block, namespace)
        else:
            _run_shell(page, number, block)
