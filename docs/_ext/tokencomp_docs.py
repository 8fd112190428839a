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
from tokencomp.constraints import describe
from tokencomp.registry import capability_row


def _cell(text: str) -> str:
    return " ".join(str(text).split()) or "\\-"


def _defaults(name: str) -> str:
    params = tc.create(name).get_params()
    return ", ".join(f"``{k}={json.dumps(v)}``" for k, v in params.items()) or "none"


# The columns of the strategies table and of each strategy's page (tokencomp.registry.capability_row's
# titles; "defaults" is added here).
TABLE_COLUMNS = ("paper", "stage", "needs attention", "FlashAttention / SDPA", "text-conditioned", "defaults")
PAGE_ROWS = (
    "paper",
    "summary",
    "stage",
    "needs attention",
    "FlashAttention / SDPA",
    "text-conditioned",
    "deterministic",
    "context it needs",
    "time",
    "padded batches",
    "defaults",
)


def _row(name: str) -> dict[str, str]:
    """capability_row(name) as reST cells, with the class linked and the defaults."""
    row = {k: _cell(v) for k, v in capability_row(name).items()}
    row["class"] = f":class:`{row['class']}`"
    row["context it needs"] = ", ".join(f"``{r}``" for r in tc.get(name).requires) or "none"
    row["time"] = f"``{row['time']}``" if tc.get(name).complexity else "undeclared"
    row["padded batches"] = f"``{row['padded batches']}``"
    row["defaults"] = _defaults(name)
    return row


def _parameters(name: str) -> list[str]:
    """The parameters' defaults and what each allows (its ``parameter_constraints``), as a reST table."""
    cls, params = tc.get(name), tc.create(name).get_params()
    if not params:
        return ["It takes no parameters.", ""]
    lines = [
        ".. list-table:: Parameters",
        "   :header-rows: 1",
        "   :widths: 20 20 60",
        "",
        "   * - parameter",
        "     - default",
        "     - allowed",
    ]
    for param, value in params.items():
        lines += [
            f"   * - ``{param}``",
            f"     - ``{value!r}``",
            f"     - {_cell(describe(cls.parameter_constraints[param]))}",
        ]
    return [*lines, ""]


def _table() -> str:
    lines = [
        ".. list-table:: Registered strategies (generated from the registry when the docs are built)",
        "   :header-rows: 1",
        "   :widths: 12 30 8 8 16 8 18",
        "",
        "   * - name",
        *(f"     - {c}" for c in TABLE_COLUMNS),
    ]
    for name in tc.available():
        row = _row(name)
        lines += [f"   * - :doc:`{name} <generated/{name}>`", *(f"     - {row[c]}" for c in TABLE_COLUMNS)]
    return "\n".join(lines) + "\n"


def _page(name: str, index: bool = True) -> str:
    cls = tc.get(name)
    title = f"``{name}``"
    row = _row(name)
    table = [".. list-table::", "   :widths: 25 75", ""]
    for key in ("class", *PAGE_ROWS):
        table += [f"   * - {key}", f"     - {row[key]}"]
    return (
        "\n".join(
            [
                title,
                "=" * len(title),
                "",
                *table,
                "",
                f"Create it with ``tc.create({name!r}, ...)``; the parameters are those of the class below.",
                "",
                *_parameters(name),
                "Algorithm",
                "---------",
                "",
                f".. automodule:: {cls.__module__}",
                "   :no-members:",
                *([] if index else ["   :no-index:"]),
                "",
                "Class",
                "-----",
                "",
                f".. autoclass:: {cls.__module__}.{cls.__qualname__}",
                "   :no-members:",
                "",
            ]
        )
        + "\n"
    )


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
        out += [
            title,
            "-" * len(title),
            "",
            ".. code-block:: text",
            "",
            "   " + command.get_usage(ctx).replace("Usage: ", ""),
            "",
            (command.help or "").strip(),
            "",
        ]
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
