"""``report.md`` and PNG plots from saved ablation results (``tokencomp report DIR`` re-renders them).

Everything here reads result rows (see :mod:`tokencomp.analysis.results`), never the models, so a report
can be rebuilt from ``results.json`` alone. Tables are relative to the uncompressed model (its row is the
reference: error 0, agreement 1, KL 0); the best value of each budget is marked. The summary compares
the focus strategy (ApET by default, at its default parameters) with the simple references (the
registered strategies without a paper, e.g. ``random`` and ``pooling``) image by image: a paired mean
difference with its 95 % confidence interval, and a verdict only when the interval excludes zero.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

import tokencomp as tc
from tokencomp.errors import InputError

from .grid import DEFAULT_FOCUS
from .results import flash_measurements, mean_ci, write_atomic

__all__ = [
    "METRICS", "MetricTable", "compare", "eager_ratios", "label", "metric_table", "render_markdown", "render_plots",
    "write_report",
]


@dataclass(frozen=True)
class Metric:
    key: str
    ci: Optional[str]
    title: str
    higher_is_better: bool
    uncompressed: float


METRICS = (
    Metric("recon_error", "recon_error_ci95", "Reconstruction error (relative Frobenius; every input token rebuilt "
           "from the output standing for it, nearest output if dropped)", False, 0.0),
    Metric("lstsq_error", "lstsq_error_ci95", "Least-squares error (inputs projected on the span of the outputs)", False, 0.0),
    Metric("pred_agreement", "pred_agreement_ci95", "Top-1 agreement of the ImageNet head on the pooled tokens "
           "(outputs weighted by the inputs they stand for) with the uncompressed tokens", True, 1.0),
    Metric("pred_kl", "pred_kl_ci95", "KL(uncompressed || compressed) of the ImageNet head's prediction, nats", False, 0.0),
    Metric("next_token_agreement", "next_token_agreement_ci95", "Next-token top-1 agreement with the uncompressed VLM", True, 1.0),
    Metric("logit_kl", "logit_kl_ci95", "KL(uncompressed || compressed) of the VLM's next-token distribution, nats", False, 0.0),
    Metric("position_bias", None, "Position bias: Wasserstein distance of the kept positions from uniform after "
           "shuffling the contents over the grid (0 = position-blind)", False, 0.0),
    Metric("time_ms", None, "Compression time per batch of images (ms; VLM rows: the whole compressed prefill)", False, math.nan),
)
_BY_KEY = {m.key: m for m in METRICS}


def _num(value: Any) -> float:
    return math.nan if value is None or value == "" else float(value)


def _params(row: dict[str, Any]) -> dict[str, Any]:
    return json.loads(row["params"]) if isinstance(row["params"], str) else dict(row["params"])


def label(row: dict[str, Any]) -> str:
    """``strategy`` and its parameters (the seed left out)."""
    shown = {k: v for k, v in _params(row).items() if k != "seed"}
    return row["strategy"] + "".join(f" {k}={v}" for k, v in shown.items())


@functools.lru_cache(maxsize=None)
def _defaults(strategy: str) -> Optional[dict[str, str]]:
    """A strategy's default parameters, each as JSON (tuples and lists alike); ``None`` if unknown."""
    try:
        return {k: json.dumps(v, sort_keys=True) for k, v in tc.create(strategy).get_params().items()}
    except InputError:  # a strategy this version does not have, or no longer accepts its defaults
        return None


def _is_default(row: dict[str, Any]) -> bool:
    defaults = _defaults(row["strategy"])
    if defaults is None:
        return False
    params = {k: v for k, v in _params(row).items() if k != "seed"}
    return all(k in defaults and defaults[k] == json.dumps(v, sort_keys=True) for k, v in params.items())


def eager_ratios(row: dict[str, Any]) -> Optional[tuple[float, float]]:
    """Eager over SDPA attention (time, peak memory) of a row, at its largest measured shape; ``None``
    when the row needed no eager attention."""
    if row.get("eager_ms") is None:
        return None
    return row["eager_ms"] / row["sdpa_ms"], row["eager_peak_mib"] / max(row["sdpa_peak_mib"], 1e-9)


def _budget_name(budget: Any) -> str:
    return "own schedule" if budget is None else f"budget {budget}"


@dataclass
class MetricTable:
    """A metric of one feature set: ``columns`` (budgets), and per configuration a label and cells
    ``(value, ci, best)`` (``None`` where the configuration did not run at that budget)."""

    features: str
    metric: Metric
    columns: list[Any]
    kept: dict[Any, str]
    rows: list[tuple[str, list[Optional[tuple[float, float, bool]]]]]
    n_images: int


def metric_table(rows: list[dict[str, Any]], features: str, key: str) -> Optional[MetricTable]:
    """The table of metric ``key`` over the rows of ``features`` (``None`` when no row has it)."""
    metric = _BY_KEY[key]
    subset = [r for r in rows if r["features"] == features and not r.get("skipped")]
    if not any(not math.isnan(_num(r.get(key))) for r in subset):
        return None
    columns = list(dict.fromkeys(r["budget"] for r in subset))
    columns.sort(key=lambda b: (b is None, b if b is not None else 0))
    kept = {}
    for b in columns:
        ks = sorted({_num(r["kept"]) for r in subset if r["budget"] == b})
        kept[b] = "kept " + "/".join(f"{k:g}" for k in ks) if b is None else f"keep {ks[0]:g}" if len(ks) == 1 else f"budget {b}"
    pick = max if metric.higher_is_better else min
    best = {}
    for b in columns:
        values = [_num(r.get(key)) for r in subset if r["budget"] == b and not math.isnan(_num(r.get(key)))]
        best[b] = pick(values) if values else math.nan
    body = []
    for name in dict.fromkeys(label(r) for r in subset):
        mine = {r["budget"]: r for r in subset if label(r) == name}
        cells: list[Optional[tuple[float, float, bool]]] = []
        for b in columns:
            r = mine.get(b)
            if r is None or math.isnan(_num(r.get(key))):
                cells.append(None)
                continue
            value = _num(r.get(key))
            cells.append((value, _num(r.get(metric.ci)) if metric.ci else math.nan, value == best[b]))
        body.append((name, cells))
    return MetricTable(features, metric, columns, kept, body, int(max(_num(r["n_images"]) for r in subset)))


def _fmt(cell: Optional[tuple[float, float, bool]], digits: int = 4) -> str:
    if cell is None:
        return "-"
    value, ci, _ = cell
    text = f"{value:.{digits}f}"
    return text + (f" ± {ci:.{digits}f}" if not math.isnan(ci) else "")


def compare(rows: list[dict[str, Any]], focus: str = DEFAULT_FOCUS) -> list[dict[str, Any]]:
    """The focus strategy (default parameters) against each reference, per feature set, budget and metric.

    The references are the registered strategies without a paper (``random``, ``pooling``). For each
    metric with per-image values the paired difference ``focus - reference`` is averaged with a 95 %
    confidence half-width; ``verdict`` says whether the focus keeps more information, less, or neither
    measurably.
    """
    references = [n for n in tc.available() if not tc.get(n).paper]
    out = []
    focus_rows = [r for r in rows if r["strategy"] == focus and _is_default(r) and not r.get("skipped")]
    for fr in focus_rows:
        for ref in references:
            match = [r for r in rows if r["strategy"] == ref and r["features"] == fr["features"]
                     and r["budget"] == fr["budget"] and not r.get("skipped") and _is_default(r)]
            if not match:
                continue
            rr = match[0]
            for key, values in (fr.get("per_image") or {}).items():
                other = (rr.get("per_image") or {}).get(key)
                if other is None or len(other) != len(values):
                    continue
                diff = np.asarray(values, dtype=float) - np.asarray(other, dtype=float)
                mean, ci = mean_ci(diff)
                better = mean > 0 if _BY_KEY[key].higher_is_better else mean < 0
                if math.isnan(ci) or abs(mean) <= ci:
                    verdict = "no measurable difference"
                else:
                    verdict = f"{focus} keeps more" if better else f"{focus} keeps less"
                out.append({
                    "features": fr["features"], "budget": fr["budget"], "kept": fr["kept"], "metric": key,
                    "focus": float(np.mean(values)), "reference": ref, "reference_value": float(np.mean(other)),
                    "difference": mean, "ci95": ci, "n": len(diff), "verdict": verdict,
                })
    return out


# ---------------------------------------------------------------- markdown
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
    measured = flash_measurements(rows)
    if not measured:
        return ["No strategy was run inside a VLM (`--no-vlm`), so FlashAttention compatibility was not measured."]
    lines = [
        "| strategy | runs under forced FLASH_ATTENTION | what fails | eager attention layer | eager / SDPA time | eager / SDPA peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for name, (ran, failed) in measured.items():
        if not ran:
            reason = next(r["skipped"] for r in rows if r.get("flash_measured") and r["strategy"] == name)
            lines.append(f"| {name} | not run | {reason} | | | |")
            continue
        if failed is None:
            lines.append(f"| {name} | yes | | | | |")
            continue
        costs = failed.get("eager_cost") or {}
        where = "; ".join(f"{k} (L={c['length']}, {c['heads']}x{c['head_dim']})" for k, c in costs.items())
        times = "; ".join(f"{c['eager_ms']:.2f} / {c['sdpa_ms']:.2f} ms ({c['eager_ms'] / c['sdpa_ms']:.1f}x)" for c in costs.values())
        mems = "; ".join(
            f"{c['eager_peak_mib']:.1f} / {c['sdpa_peak_mib']:.1f} MiB"
            + (f" ({c['eager_peak_mib'] / c['sdpa_peak_mib']:.1f}x)" if c["sdpa_peak_mib"] > 0 else "")
            for c in costs.values()
        )
        error = failed["flash_error"].replace("|", "/")
        lines.append(f"| {name} | **no** (needs eager) | {error[:160]} | {where} | {times} | {mems} |")
    return lines


def render_markdown(rows: list[dict[str, Any]], meta: dict[str, Any], plots: list[str], focus: str = DEFAULT_FOCUS) -> str:
    """The text of ``report.md``."""
    lines = ["# tokencomp ablation report", ""]
    if meta:
        lines += [
            f"Run on {meta.get('date', '?')} with tokencomp {meta.get('tokencomp', '?')}, torch {meta.get('torch', '?')}, "
            f"transformers {meta.get('transformers', '?')}; seed {meta.get('seed', '?')}; "
            f"{meta.get('n_images', '?')} images ({meta.get('images', '?')}), views {', '.join(meta.get('views', []))} "
            f"for feature sets with a classifier head; budgets {', '.join(str(b) for b in meta.get('budgets', []))}.",
            "",
        ]
        for note in meta.get("notes", []):
            lines += [f"- {note}"]
        lines.append("")
    verdicts = compare(rows, focus)
    if verdicts:
        lines += [f"## {focus} against the simple references", "",
                  f"Paired over images: mean of ({focus} - reference) with its 95 % CI. A verdict needs the CI to "
                  "exclude zero.", "",
                  f"| features | budget | metric | {focus} | reference | reference value | difference (95 % CI) | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in verdicts:
            lines.append(
                f"| {v['features']} | {v['kept']:g} | {v['metric']} | {v['focus']:.4f} | {v['reference']} | "
                f"{v['reference_value']:.4f} | {v['difference']:+.4f} ± {v['ci95']:.4f} | {v['verdict']} |"
            )
        lines.append("")
    lines += ["## FlashAttention compatibility (measured)", "",
              "Each strategy ran inside the VLM under SDPA with `torch.nn.attention.sdpa_kernel` forcing the "
              "FLASH_ATTENTION backend and no eager fallback. Where that fails, the eager attention it needs is "
              "timed against SDPA at the same length, at this model's shape and at LLaVA-1.5-7B's.", ""]
    lines += _flash_lines(rows) + [""]
    for features in dict.fromkeys(r["features"] for r in rows):
        lines += [f"## {features}", ""]
        skipped = [r for r in rows if r["features"] == features and r.get("skipped")]
        for metric in METRICS:
            table = metric_table(rows, features, metric.key)
            if table is None:
                continue
            direction = "higher" if metric.higher_is_better else "lower"
            ci = ", mean ± 95 % CI" if metric.ci else ""
            lines += [f"### {metric.title}", "", f"{table.n_images} images{ci}; {direction} is better; best per budget in bold.", ""]
            lines += _md_table(table) + [""]
        if skipped:
            lines += ["Not run here:", ""] + [f"- {label(r)} ({_budget_name(r['budget'])}): {r['skipped']}" for r in skipped] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _representatives(rows: list[dict[str, Any]], features: str) -> list[dict[str, Any]]:
    """One row per strategy at its smallest budget: the default configuration where there is one."""
    subset = [r for r in rows if r["features"] == features and not r.get("skipped") and r.get("heatmap")]
    out = []
    for name in dict.fromkeys(r["strategy"] for r in subset):
        mine = [r for r in subset if r["strategy"] == name]
        preferred = [r for r in mine if _is_default(r)] or mine
        out.append(min(preferred, key=lambda r: _num(r["kept"])))
    return out


def plot_retention(rows: list[dict[str, Any]], features: str, path: Path) -> bool:
    """Retention metrics against tokens kept, one line per configuration (focus variants thin)."""
    keys = [k for k in ("recon_error", "lstsq_error", "pred_agreement", "next_token_agreement", "logit_kl")
            if metric_table(rows, features, k) is not None]
    if not keys:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2), squeeze=False)
    subset = [r for r in rows if r["features"] == features and not r.get("skipped") and r["budget"] is not None]
    colours = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(r["strategy"] for r in subset))}
    for ax, key in zip(axes[0], keys):
        metric = _BY_KEY[key]
        for name in dict.fromkeys(label(r) for r in subset):
            mine = sorted((r for r in subset if label(r) == name), key=lambda r: _num(r["kept"]))
            xs = [_num(r["kept"]) for r in mine]
            ys = [_num(r.get(key)) for r in mine]
            if all(math.isnan(y) for y in ys):
                continue
            errs = [_num(r.get(metric.ci)) for r in mine] if metric.ci else None
            variant = not _is_default(mine[0])
            ax.errorbar(xs, ys, yerr=errs, marker="o", ms=3, capsize=2, lw=0.6 if variant else 1.6, color=colours[mine[0]["strategy"]],
                        alpha=0.35 if variant else 1.0, label=None if variant else mine[0]["strategy"])
        ax.set_xlabel("tokens kept")
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    return _finish(plt, fig, f"{features}: retention against budget (thin lines: parameter variants)", path)


def _finish(plt, fig, title: str, path: Path) -> bool:
    """Title, lay out, save and close a figure."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return True


def _panels(plt, n: int):
    """A figure of ``n`` small image panels, six to a row, axes off."""
    cols = min(6, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(2.4 * cols, 2.6 * rows_n), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, list(axes.flat)


def plot_heatmaps(rows: list[dict[str, Any]], features: str, path: Path) -> bool:
    """Share of images keeping each grid position, one panel per strategy, side by side."""
    reps = [r for r in _representatives(rows, features) if r.get("grid")]
    if not reps:
        return False
    plt = _plt()
    fig, axes = _panels(plt, len(reps))
    for ax, r in zip(axes, reps):
        h, w = r["grid"][-2:]
        ax.imshow(np.asarray(r["heatmap"], dtype=float).reshape(h, w), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{r['strategy']}\nkeep {_num(r['kept']):g}, bias {_num(r.get('position_bias')):.3f}", fontsize=8)
    return _finish(plt, fig, f"{features}: where kept tokens sit (share of images keeping each position)", path)


def plot_overlays(rows: list[dict[str, Any]], features: str, image: np.ndarray, path: Path) -> bool:
    """The example image with the tokens each strategy keeps shown and the rest dimmed."""
    import torch

    from tokencomp.analysis.features import square_image

    reps = [r for r in _representatives(rows, features) if r.get("example_kept") is not None and r.get("grid")]
    if not reps:
        return False
    plt = _plt()
    h, w = reps[0]["grid"][-2:]
    side = 14 * max(h, w)
    pic = square_image(image, side).permute(1, 2, 0).numpy()
    fig, axes = _panels(plt, len(reps))
    for ax, r in zip(axes, reps):
        mask = torch.zeros(h * w)
        mask[torch.tensor(r["example_kept"], dtype=torch.long)] = 1
        up = mask.view(h, w).repeat_interleave(side // h, 0).repeat_interleave(side // w, 1).numpy()[..., None]
        ax.imshow(pic * (0.25 + 0.75 * up))
        ax.set_title(f"{r['strategy']} (keep {_num(r['kept']):g})", fontsize=8)
    return _finish(plt, fig, f"{features}: kept tokens on the example image (dimmed: dropped or merged away)", path)


def plot_flash(rows: list[dict[str, Any]], path: Path) -> bool:
    """The measured FlashAttention compatibility as a table figure."""
    measured = {name: m for name, m in flash_measurements(rows).items() if m[0]}
    if not measured:
        return False
    plt = _plt()
    cells, colours = [], []
    for name, (_, failed) in measured.items():
        if failed is None:
            cells.append([name, "yes", "", "", ""])
            colours.append(["white", "#c8e6c9", "white", "white", "white"])
            continue
        costs = failed.get("eager_cost") or {}
        kind = next(iter(costs)).replace("this model's ", "") if costs else ""
        ratios = eager_ratios(failed)
        cells.append([name, "no: needs eager", kind] + ([f"{ratios[0]:.1f}x", f"{ratios[1]:.1f}x"] if ratios else ["", ""]))
        colours.append(["white", "#ffcdd2", "white", "white", "white"])
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(cells) + 1.0))
    ax.axis("off")
    table = ax.table(cellText=cells, cellColours=colours, loc="center",
                     colLabels=["strategy", "forced\nFLASH_ATTENTION", "eager layer", "eager / SDPA time\n(LLaVA-1.5-7B shape)",
                                "eager / SDPA peak memory\n(LLaVA-1.5-7B shape)"], cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.4)
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_height(cell.get_height() * 1.8)
    return _finish(plt, fig, "FlashAttention compatibility, measured inside the VLM", path)


def render_plots(rows: list[dict[str, Any]], out: Path, example: Optional[np.ndarray]) -> list[str]:
    """Write the PNG plots under ``out/plots``; returns their paths relative to ``out``."""
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for features in dict.fromkeys(r["features"] for r in rows):
        slug = features.replace(":", "_").replace("/", "_")
        for kind, draw in (("retention", plot_retention), ("heatmaps", plot_heatmaps)):
            if draw(rows, features, folder / f"{kind}_{slug}.png"):
                made.append(f"plots/{kind}_{slug}.png")
        if example is not None and plot_overlays(rows, features, example, folder / f"overlay_{slug}.png"):
            made.append(f"plots/overlay_{slug}.png")
    if plot_flash(rows, folder / "flash_compatibility.png"):
        made.append("plots/flash_compatibility.png")
    return made


def write_report(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], example: Optional[np.ndarray],
                 focus: str = DEFAULT_FOCUS) -> Path:
    """Render the plots and ``report.md`` into ``out``; returns the report's path."""
    plots = render_plots(rows, out, example)
    text = render_markdown(rows, meta, plots, focus)
    path = out / "report.md"
    write_atomic(path, lambda fh: fh.write(text))
    return path
