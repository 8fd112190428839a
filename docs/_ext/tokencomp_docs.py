"""Sphinx extension: the strategy pages and the strategies table, written from the registry at build time.

At ``builder-inited`` it writes ``strategies/table.inc`` (one row per registered strategy:
name, paper, stage, needs attention, FlashAttention, text-conditioned, defaults) and one page
``strategies/generated/<name>.rst`` per strategy (its capabilities, defaults, the module docstring with
the algorithm and citation, and the class). A strategy registered tomorrow gets its row and page without
touching the docs. Files are rewritten only when their text changes, so incremental builds stay cheap.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

import tokencomp as tc
from tokencomp.cli import app



def _cell(text: str) -> str:
    return " ".join(str(text).split()) or "\\-"


def _defaults(name: str) -> str:
    params = tc.create(name).get_params()
    return ", ".join(f"``{k}={json.dumps(v)}``" for k, v in params.items()) or "none"


def _table() -> str:
    lines = [
        ".. list-table:: Registered strategies (generated from the registry when the docs are built)",
        "   :header-rows: 1",
        "   :widths: 12 30 8 8 16 8 18",
        "",
        "   * - name",
        "     - paper",
        "     - stage",
        "     - needs attention",
        "     - FlashAttention / SDPA",
        "     - text-conditioned",
        "     - defaults",
    ]
    for name in tc.available():
        cls = tc.get(name)
        lines += [
            f"   * - :doc:`{name} <generated/{name}>`",
            f"     - {_cell(cls.paper or '(reference)')}",
            f"     - {cls.stage}",
            f"     - {'yes' if cls.needs_attention else 'no'}",
            f"     - {_cell(cls.flash_attention())}",
            f"     - {'yes' if cls.text_conditioned else 'no'}",
            f"     - {_defaults(name)}",
        ]
    return "\n".join(lines) + "\n"


def _page(name: str, index: bool = True) -> str:
    cls = tc.get(name)
    title = f"``{name}``"
    rows = [
        ("class", f":class:`{cls.__module__}.{cls.__qualname__}`"),
        ("paper", _cell(cls.paper or "(reference strategy)")),
        ("summary", _cell(cls.summary)),
        ("stage", cls.stage),
        ("needs attention", "yes" if cls.needs_attention else "no"),
        ("FlashAttention / SDPA", _cell(cls.flash_attention())),
        ("text-conditioned", "yes" if cls.text_conditioned else "no"),
        ("deterministic", "yes" if cls.deterministic else "no (seeded)"),
        ("context it needs", ", ".join(f"``{r}``" for r in cls.requires) or "none"),
        ("time", f"``{cls.complexity}``" if cls.complexity else "undeclared"),
        ("padded batches", f"``{cls.padding}``"),
        ("defaults", _defaults(name)),
    ]
    table = [".. list-table::", "   :widths: 25 75", ""]
    for key, value in rows:
        table += [f"   * - {key}", f"     - {value}"]
    return "\n".join([
        title, "=" * len(title), "",
        *table, "",
        f"Create it with ``tc.create({name!r}, ...)``; the parameters are those of the class below.", "",
        "Algorithm", "---------", "",
        f".. automodule:: {cls.__module__}", "   :no-members:", *([] if index else ["   :no-index:"]), "",
        "Class", "-----", "",
        f".. autoclass:: {cls.__module__}.{cls.__qualname__}", "   :no-members:", "",
    ]) + "\n"


def _cli() -> str:
    """The ``tokencomp`` commands as reST: usage, help and one row per option, read from the typer app.

    (Typer vendors its own click, which sphinx-click does not recognise, so the app is walked here.)
    """
    import typer._click as click

    group = typer.main.get_command(app)
    root = click.Context(group, info_name="tokencomp")
    out = [_cell(group.help), ""]
    for name, command in group.commands.items():
        ctx = click.Context(command, info_name=name, parent=root)
        title = f"``tokencomp {name}``"
        out += [title, "-" * len(title), "", ".. code-block:: text", "",
                "   " + command.get_usage(ctx).replace("Usage: ", ""), "",
                (command.help or "").strip(), ""]
        rows = [p.get_help_record(ctx) or (p.human_readable_name, getattr(p, "help", "") or "") for p in command.params]
        if rows:
            out += [".. list-table::", "   :widths: 35 65", ""]
            for opts, text in rows:
                out += [f"   * - ``{opts}``", f"     - {_cell(text)}"]
            out.append("")
    return "\n".join(out) + "\n"


def _write(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def generate(app) -> None:  # noqa: ANN001 - a Sphinx application
    out = Path(app.srcdir) / "strategies" / "generated"
    out.mkdir(parents=True, exist_ok=True)
    names = tc.available()
    _write(out.parent / "table.inc", _table())
    _write(Path(app.srcdir) / "cli.inc", _cli())  # included by strategies/index.rst, not a page of its own
    documented: set[str] = set()
    for name in names:
        module = tc.get(name).__module__
        _write(out / f"{name}.rst", _page(name, index=module not in documented))
        documented.add(module)
    for stale in out.glob("*.rst"):
        if stale.stem not in names:
            stale.unlink()


def setup(app):  # noqa: ANN001, ANN201 - the Sphinx extension entry point
    app.connect("builder-inited", generate)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
