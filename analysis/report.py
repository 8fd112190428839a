"""``report.md`` and PNG plots from saved ablation results (``tokencomp report DIR`` re-renders them).

Everything here reads result rows (see :mod:`tokencomp.analysis.results`), never the models, so a report
can be rebuilt from ``results.json`` alone. Tables are relative to the uncompressed model (its row is the
reference: error 0, agreement 1, KL 0); the best value of each budget is marked. The summary compares
the focus strategy (ApET by default, at its default parameters) with the simple references (the
registered strategies without a paper, e.g. ``random`` and ``pooling``) image by image: a paired mean
difference with its 95 % confidence interval, and a verdict only when the interval excludes zero.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .grid import DEFAULT_FOCUS
from .plots import render_plots
from .results import write_atomic
from .tables import (
    METRICS,
    MetricTable,
    budget_name,
    compare,
    feature_order,
    flash_table,
    label,
    metric_table,
    type_table,
    uncompressed_accuracy,
)
from .vqa import VQA_FEATURES

__all__ = ["render_markdown", "write_report"]


def _fmt(cell: Optional[tuple[float, float, bool]], digits: int = 4) -> str:
    if cell is None:
        return "-"
    value, ci, _ = cell
    text = f"{value:.{digits}f}"
    return text + (f" ± {ci:.{digits}f}" if not math.isnan(ci) else "")


def _md_table(table: MetricTable) -> list[str]:
    m = table.metric
    head = ["strategy"] + [table.kept[b] for b in table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if not math.isnan(m.uncompressed):
        lines.append("| *uncompressed* | " + " | ".join(f"*{m.uncompressed:g}*" for _ in table.columns) + " |")
    for name, cells in table.rows:
        shown = [(f"**{_fmt(c)}**" if c is not None and c[2] else _fmt(c)) for c in cells]
        lines.append(f"| {name} | " + " | ".join(shown) + " |")
    return lines


def _flash_lines(rows: list[dict[str, Any]]) -> list[str]:
    table = flash_table(rows)
    if not table:
        return ["No strategy was run inside a VLM (`--no-vlm`), so FlashAttention compatibility was not measured."]
    lines = [
        "| strategy | runs under forced FLASH_ATTENTION | what fails | eager attention layer "
        "| eager / SDPA time | eager / SDPA peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for f in table:
        if not f.ran:
            lines.append(f"| {f.strategy} | not run | {f.reason} | | | |")
            continue
        if not f.failed:
            lines.append(f"| {f.strategy} | yes | | | | |")
            continue
        where = "; ".join(f"{k} (L={c['length']}, {c['heads']}x{c['head_dim']})" for k, c in f.costs.items())
        times = "; ".join(
            f"{c['eager_ms']:.2f} / {c['sdpa_ms']:.2f} ms ({c['eager_ms'] / c['sdpa_ms']:.1f}x)"
            for c in f.costs.values()
        )
        mems = "; ".join(
            f"{c['eager_peak_mib']:.1f} / {c['sdpa_peak_mib']:.1f} MiB"
            + (f" ({c['eager_peak_mib'] / c['sdpa_peak_mib']:.1f}x)" if c["sdpa_peak_mib"] > 0 else "")
            for c in f.costs.values()
        )
        error = f.reason.replace("|", "/")
        lines.append(f"| {f.strategy} | **no** (needs eager) | {error[:160]} | {where} | {times} | {mems} |")
    return lines


def _features_section(rows: list[dict[str, Any]], features: str) -> list[str]:
    """The metric tables of one feature set (for the in-model answers also the uncompressed accuracy and
    the accuracy per question type), and what did not run."""
    lines = [f"## {features}", ""]
    for n, accuracy in uncompressed_accuracy(rows, features):
        lines.append(f"Uncompressed: accuracy {accuracy:.3f} on the first {n} questions.")
    if lines[-1]:
        lines.append("")
    skipped = [r for r in rows if r["features"] == features and r.get("skipped")]
    for metric in METRICS:
        table = metric_table(rows, features, metric.key)
        if table is None:
            continue
        direction = "higher" if metric.higher_is_better else "lower"
        ci = ", mean ± 95 % CI" if metric.ci else ""
        what = (
            f"{table.n_questions} questions on {table.n_images} images"
            if table.n_questions
            else f"{table.n_images} images"
        )
        lines += [f"### {metric.title}", "", f"{what}{ci}; {direction} is better; best per budget in bold.", ""]
        lines += _md_table(table) + [""]
    types, body = type_table(rows, features)
    if body:
        lines += ["### Accuracy per question type (compressed / uncompressed, questions)", ""]
        lines += ["| strategy | " + " | ".join(types) + " |", "|" + "---|" * (len(types) + 1)]
        lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in body] + [""]
    if skipped:
        lines += (
            ["Not run here:", ""]
            + [f"- {label(r)} ({budget_name(r['budget'])}): {r['skipped']}" for r in skipped]
            + [""]
        )
    return lines


def render_markdown(
    rows: list[dict[str, Any]], meta: dict[str, Any], plots: list[str], focus: str = DEFAULT_FOCUS
) -> str:
    """The text of ``report.md``."""
    lines = ["# tokencomp ablation report", ""]
    if meta:
        lines += [
            f"Run on {meta.get('date', '?')} with tokencomp {meta.get('tokencomp', '?')}, "
            f"torch {meta.get('torch', '?')}, "
            f"transformers {meta.get('transformers', '?')}; seed {meta.get('seed', '?')}; "
            f"{meta.get('n_images', '?')} images ({meta.get('images', '?')}), views {', '.join(meta.get('views', []))} "
            f"for feature sets with a classifier head; budgets {', '.join(str(b) for b in meta.get('budgets', []))}.",
            "",
        ]
        for note in meta.get("notes", []):
            lines += [f"- {note}"]
        lines.append("")
    sections = {features: _features_section(rows, features) for features in feature_order(rows)}
    if VQA_FEATURES in sections:  # the headline: what compression does to a real model's answers
        lines += sections.pop(VQA_FEATURES)
    verdicts = compare(rows, focus)
    if verdicts:
        lines += [
            f"## {focus} against the simple references",
            "",
            f"Paired over images (over questions for {VQA_FEATURES}): mean of ({focus} - reference) with its 95 % "
            "CI. A verdict needs the CI to exclude zero.",
            "",
            f"| features | budget | metric | {focus} | reference | reference value | difference (95 % CI) | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for v in verdicts:
            lines.append(
                f"| {v['features']} | {v['kept']:g} | {v['metric']} | {v['focus']:.4f} | {v['reference']} | "
                f"{v['reference_value']:.4f} | {v['difference']:+.4f} ± {v['ci95']:.4f} | {v['verdict']} |"
            )
        lines.append("")
    lines += [
        "## FlashAttention compatibility (measured)",
        "",
        "Each strategy ran inside the VLM under SDPA with `torch.nn.attention.sdpa_kernel` forcing the "
        "FLASH_ATTENTION backend and no eager fallback. Where that fails, the eager attention it needs is "
        "timed against SDPA at the same length, at this model's shape and at LLaVA-1.5-7B's.",
        "",
    ]
    lines += _flash_lines(rows) + [""]
    for section in sections.values():
        lines += section
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(
    out: Path,
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    example: Optional[np.ndarray],
    focus: str = DEFAULT_FOCUS,
) -> Path:
    """Render the plots and ``report.md`` into ``out``; returns the report's path."""
    plots = render_plots(rows, out, example)
    text = render_markdown(rows, meta, plots, focus)
    path = out / "report.md"
    write_atomic(path, lambda fh: fh.write(text))
    return path
