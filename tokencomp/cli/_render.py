"""Every table the commands print (rich) and the README's strategy table (Markdown).

The commands compute; this module only formats what they computed.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from rich.markup import escape
from rich.table import Table

import tokencomp as tc
from tokencomp.registry import capability_row

from ._app import console

__all__ = [
    "ablation_tables",
    "bench_goals",
    "bench_scaling",
    "bench_strategies",
    "generate_answers",
    "strategy_markdown",
    "strategy_table",
]

# The columns of `tokencomp ls` (capability_row's titles: short headers for a terminal) and of the README.
LS_COLUMNS = {
    "name": "name",
    "stage": "stage",
    "needs attention": "needs attention",
    "FlashAttention / SDPA": "FlashAttention",
    "text-conditioned": "text",
    "deterministic": "deterministic",
    "context it needs": "needs context",
    "time": "time",
    "summary": "summary",
}
MARKDOWN_COLUMNS = ("name", "paper", "stage", "needs attention", "FlashAttention / SDPA", "time", "summary")


def _table(title: str, columns: Iterable[str], rows: Iterable[Sequence[str]], **column: Any) -> None:
    """Print a rich table of ``rows`` under ``columns``."""
    table = Table(title=title, title_justify="left")
    for name in columns:
        table.add_column(name, **column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def strategy_table() -> None:
    """``tokencomp ls``: one row per registered strategy."""
    rows = [[capability_row(name)[c] for c in LS_COLUMNS] for name in tc.available()]
    _table("tokencomp strategies", LS_COLUMNS.values(), rows, overflow="fold")


def strategy_markdown() -> str:
    """The registry as a Markdown table: name, paper, stage, needs attention, FlashAttention, time, summary."""
    lines = ["| " + " | ".join(MARKDOWN_COLUMNS) + " |", "|" + "---|" * len(MARKDOWN_COLUMNS)]
    for name in tc.available():
        row = capability_row(name)
        cells = [f"`{name}`", *(row[c] for c in MARKDOWN_COLUMNS[1:])]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _mean_ci(cell: Any) -> str:
    """A metric table's cell (mean, CI half-width, best) as text, the best in bold green."""
    if cell is None:
        return "-"
    text = f"{cell[0]:.4f}" + (f" ± {cell[1]:.4f}" if not math.isnan(cell[1]) else "")
    return f"[bold green]{text}[/]" if cell[2] else text


def ablation_tables(rows: list[dict[str, Any]]) -> None:
    """One table per feature set and metric (mean ± 95 % CI), the in-model answers first (with the accuracy
    per question type), then the FlashAttention measurements."""
    from tokencomp.analysis.tables import METRICS, feature_order, metric_table, type_table, uncompressed_accuracy

    for features in feature_order(rows):
        for n, accuracy in uncompressed_accuracy(rows, features):
            console.print(f"{features} uncompressed: accuracy {accuracy:.3f} on the first {n} questions")
        for metric in METRICS:
            table = None if metric.key == "time_ms" else metric_table(rows, features, metric.key)
            if table is None:
                continue
            direction = "higher" if metric.higher_is_better else "lower"
            ci = ", mean ± 95% CI" if metric.ci else ""
            what = f"{table.n_questions} questions" if table.n_questions else f"{table.n_images} images"
            _table(
                f"{metric.title} ({features}, {what}{ci}; {direction} is better)",
                ["strategy", *(table.kept[b] for b in table.columns)],
                [[name, *map(_mean_ci, cells)] for name, cells in table.rows],
            )
        types, body = type_table(rows, features)
        if body:
            _table(
                f"Accuracy per question type ({features}; compressed / uncompressed (questions))",
                ["strategy", *types],
                [[name, *cells] for name, cells in body],
            )
    _flash_table(rows)


def _flash_table(rows: list[dict[str, Any]]) -> None:
    from tokencomp.analysis.tables import flash_table

    shown = []
    for f in flash_table(rows):
        if not f.ran:
            continue
        cost = "" if f.ratios is None else f"{f.ratios[0]:.1f}x time, {f.ratios[1]:.1f}x memory"
        shown.append([f.strategy, "[red]no: needs eager[/]" if f.failed else "[green]yes[/]", cost])
    if shown:
        _table(
            "FlashAttention compatibility, measured inside the VLM (forced FLASH_ATTENTION backend)",
            ("strategy", "runs under FlashAttention", "eager / SDPA time, memory (LLaVA-1.5-7B shape)"),
            shown,
        )


def _met(flag: Any) -> str:
    return "?" if flag is None else ("[green]yes[/]" if flag else "[red]no[/]")


def bench_goals(references: list[dict[str, Any]], goals: list[Any]) -> None:
    """ApET's goals (ratios against its references) and the reference timings behind them."""
    _table(
        "ApET against its references (ratios measured in this run)",
        ("goal", "measured", "limit", "met"),
        [[g.name, f"{g.ratio:.3f}", f"{g.limit:g}", _met(g.met)] for g in goals],
    )
    _table(
        "reference timings (ms, fastest call)",
        ("shape", "reference", "ApET", "reference ms"),
        [[r["shape"], r["reference"], f"{r['ours_ms']:.2f}", f"{r['reference_ms']:.2f}"] for r in references],
    )


def bench_scaling(summary: list[dict[str, Any]], first: int, last: int) -> None:
    """Each strategy's fitted slope against its declared complexity, from ``first`` to ``last`` tokens."""
    _table(
        f"scaling from {first} to {last} tokens (12.5 % kept)",
        ("strategy", "complexity", "fitted slope", "within", "largest N", "peak x input"),
        [
            [
                escape(r["strategy"]),
                r["complexity"],
                f"{r['slope']:.2f}",
                _met(r["ok"]),
                str(r["largest_n"]),
                f"{r['max_x_input']:.2f}",
            ]
            for r in summary
        ],
    )


def bench_strategies(rows: list[dict[str, Any]]) -> None:
    """Each strategy's fastest call at each shape, against one matmul and the input size."""
    _table(
        "strategies (ms of the fastest call; ratio to one [B N, D] x [D, K] matmul; peak over input size)",
        ("shape", "strategy", "ms", "x matmul", "peak MiB", "x input"),
        [
            [
                r["shape"],
                r["strategy"],
                f"{r['ms']:.2f}",
                f"{r['x_matmul']:.2f}",
                f"{r['peak_mib']:.1f}",
                f"{r['x_input']:.2f}",
            ]
            for r in rows
        ],
    )


def generate_answers(title: str, answers: list[Any]) -> None:
    """The uncompressed and compressed answers of ``tokencomp generate``."""
    _table(
        title,
        ("run", "prompt tokens", "visual tokens in -> out", "seconds", "answer"),
        [
            [
                a.label,
                str(a.prompt_tokens),
                f"{a.visual_tokens_in} -> {a.visual_tokens_out}",
                f"{a.seconds:.2f}",
                a.text,
            ]
            for a in answers
        ],
        overflow="fold",
    )
