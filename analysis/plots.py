"""The report's PNG plots (matplotlib, Agg): retention curves, kept-position heatmaps, kept-token
overlays on an image, and the FlashAttention measurements."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .tables import METRIC_BY_KEY, as_float, feature_order, flash_table, is_default, labels, metric_table
from .vqa import VQA_FEATURES

__all__ = ["plot_answer_cells", "plot_flash", "plot_heatmaps", "plot_overlays", "plot_retention", "render_plots"]


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
        preferred = [r for r in mine if is_default(r)] or mine
        out.append(min(preferred, key=lambda r: as_float(r["kept"])))
    return out


def plot_retention(rows: list[dict[str, Any]], features: str, path: Path) -> bool:
    """Retention metrics against tokens kept, one line per configuration (focus variants thin)."""
    keys = [
        k
        for k in (
            "relative_accuracy",
            "accuracy",
            "recon_error",
            "lstsq_error",
            "pred_agreement",
            "next_token_agreement",
            "logit_kl",
        )
        if metric_table(rows, features, k) is not None
    ]
    if not keys:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2), squeeze=False)
    subset = [r for r in rows if r["features"] == features and not r.get("skipped") and r["budget"] is not None]
    colours = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(r["strategy"] for r in subset))}
    for ax, key in zip(axes[0], keys):
        metric = METRIC_BY_KEY[key]
        names = labels(subset)
        for name in dict.fromkeys(names):
            mine = sorted((r for r, n in zip(subset, names) if n == name), key=lambda r: as_float(r["kept"]))
            xs = [as_float(r["kept"]) for r in mine]
            ys = [as_float(r.get(key)) for r in mine]
            if all(math.isnan(y) for y in ys):
                continue
            errs = [as_float(r.get(metric.ci)) for r in mine] if metric.ci else None
            variant = not is_default(mine[0])
            ax.errorbar(
                xs,
                ys,
                yerr=errs,
                marker="o",
                ms=3,
                capsize=2,
                lw=0.6 if variant else 1.6,
                color=colours[mine[0]["strategy"]],
                alpha=0.35 if variant else 1.0,
                label=None if variant else mine[0]["strategy"],
            )
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
        bias = as_float(r.get("position_bias"))
        shown = "" if math.isnan(bias) else f", bias {bias:.3f}"
        ax.set_title(f"{r['strategy']}\nkeep {as_float(r['kept']):g}{shown}", fontsize=8)
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
        ax.set_title(f"{r['strategy']} (keep {as_float(r['kept']):g})", fontsize=8)
    return _finish(plt, fig, f"{features}: kept tokens on the example image (dimmed: dropped or merged away)", path)


def plot_answer_cells(rows: list[dict[str, Any]], features: str, path: Path) -> bool:
    """Positional bias in the answers: per strategy (its smallest budget), the accuracy change against
    uncompressed by the 3 x 3 scenes cell the answer depends on; first panel the uncompressed accuracy."""
    reps = [r for r in _representatives(rows, features) if r.get("cell_accuracy")]
    if not reps:
        return False
    plt = _plt()
    fig, axes = _panels(plt, len(reps) + 1)
    base = reps[0]["cell_accuracy"]
    panels = [("uncompressed", np.asarray(base["accuracy_uncompressed"], float), base["n"], "viridis", (0, 1))]
    for r in reps:
        cells = r["cell_accuracy"]
        change = np.asarray(cells["accuracy"], float) - np.asarray(cells["accuracy_uncompressed"], float)
        panels.append((f"{r['strategy']} keep {as_float(r['kept']):g}", change, cells["n"], "RdBu", (-1, 1)))
    for ax, (title, values, counts, cmap, (lo, hi)) in zip(axes, panels):
        ax.imshow(values.reshape(3, 3), vmin=lo, vmax=hi, cmap=cmap)
        for k, (v, n) in enumerate(zip(values, counts)):
            ax.text(
                k % 3,
                k // 3,
                "-" if math.isnan(v) else f"{v:+.2f}\n({n})" if lo < 0 else f"{v:.2f}\n({n})",
                ha="center",
                va="center",
                fontsize=7,
            )
        ax.set_title(title, fontsize=8)
    return _finish(
        plt,
        fig,
        f"{features}: accuracy by the grid cell the answer depends on (change against uncompressed; questions)",
        path,
    )


def plot_flash(rows: list[dict[str, Any]], path: Path) -> bool:
    """The measured FlashAttention compatibility as a table figure."""
    measured = [f for f in flash_table(rows) if f.ran]
    if not measured:
        return False
    plt = _plt()
    cells, colours = [], []
    for f in measured:
        if not f.failed:
            cells.append([f.strategy, "yes", "", "", ""])
            colours.append(["white", "#c8e6c9", "white", "white", "white"])
            continue
        kind = next(iter(f.costs)).replace("this model's ", "") if f.costs else ""
        cells.append(
            [f.strategy, "no: needs eager", kind]
            + ([f"{f.ratios[0]:.1f}x", f"{f.ratios[1]:.1f}x"] if f.ratios else ["", ""])
        )
        colours.append(["white", "#ffcdd2", "white", "white", "white"])
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(cells) + 1.0))
    ax.axis("off")
    table = ax.table(
        cellText=cells,
        cellColours=colours,
        loc="center",
        colLabels=[
            "strategy",
            "forced\nFLASH_ATTENTION",
            "eager layer",
            "eager / SDPA time\n(LLaVA-1.5-7B shape)",
            "eager / SDPA peak memory\n(LLaVA-1.5-7B shape)",
        ],
        cellLoc="center",
    )
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
    for features in feature_order(rows):
        slug = features.replace(":", "_").replace("/", "_")
        for kind, draw in (("retention", plot_retention), ("heatmaps", plot_heatmaps)):
            if draw(rows, features, folder / f"{kind}_{slug}.png"):
                made.append(f"plots/{kind}_{slug}.png")
        if plot_answer_cells(rows, features, folder / f"answer_cells_{slug}.png"):
            made.append(f"plots/answer_cells_{slug}.png")
        if (
            example is not None
            and features != VQA_FEATURES
            and plot_overlays(rows, features, example, folder / f"overlay_{slug}.png")
        ):
            made.append(f"plots/overlay_{slug}.png")
    if plot_flash(rows, folder / "flash_compatibility.png"):
        made.append("plots/flash_compatibility.png")
    return made
