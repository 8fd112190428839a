"""The ablation's metrics and the tables built from result rows: one value (mean, 95 % CI, best) per
strategy configuration and budget, and the focus strategy compared with the references image by image."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

import tokencomp as tc
from tokencomp.errors import InputError

from .grid import DEFAULT_FOCUS
from .results import flash_measurements, mean_ci

__all__ = [
    "METRICS",
    "feature_order",
    "type_table",
    "uncompressed_accuracy",
    "METRIC_BY_KEY",
    "Metric",
    "MetricTable",
    "as_float",
    "budget_name",
    "compare",
    "eager_ratios",
    "is_default",
    "label",
    "labels",
    "metric_table",
]


@dataclass(frozen=True)
class Metric:
    key: str
    ci: Optional[str]
    title: str
    higher_is_better: bool
    uncompressed: float


METRICS = (
    Metric(
        "relative_accuracy",
        "relative_accuracy_ci95",
        "mini-llava's accuracy on scenes questions relative to uncompressed on the same questions "
        "(95 % CI: paired bootstrap)",
        True,
        1.0,
    ),
    Metric("accuracy", "accuracy_ci95", "mini-llava's exact-match accuracy on scenes questions", True, math.nan),
    Metric(
        "recon_error",
        "recon_error_ci95",
        "Reconstruction error (relative Frobenius; every input token rebuilt "
        "from the output standing for it, nearest output if dropped)",
        False,
        0.0,
    ),
    Metric(
        "lstsq_error",
        "lstsq_error_ci95",
        "Least-squares error (inputs projected on the span of the outputs)",
        False,
        0.0,
    ),
    Metric(
        "pred_agreement",
        "pred_agreement_ci95",
        "Top-1 agreement of the ImageNet head on the pooled tokens "
        "(outputs weighted by the inputs they stand for) with the uncompressed tokens",
        True,
        1.0,
    ),
    Metric(
        "pred_kl", "pred_kl_ci95", "KL(uncompressed || compressed) of the ImageNet head's prediction, nats", False, 0.0
    ),
    Metric(
        "next_token_agreement",
        "next_token_agreement_ci95",
        "Next-token top-1 agreement with the uncompressed VLM",
        True,
        1.0,
    ),
    Metric(
        "logit_kl",
        "logit_kl_ci95",
        "KL(uncompressed || compressed) of the VLM's next-token distribution, nats",
        False,
        0.0,
    ),
    Metric(
        "prefill_ratio",
        None,
        "Prefill time against uncompressed (the whole prompt: tower, compression, language model; median of "
        "the first questions)",
        False,
        1.0,
    ),
    Metric(
        "position_bias",
        None,
        "Position bias: Wasserstein distance of the kept positions from uniform after "
        "shuffling the contents over the grid (0 = position-blind)",
        False,
        0.0,
    ),
    Metric(
        "time_ms",
        None,
        "Compression time per batch of images (ms; VLM rows: the whole compressed prefill)",
        False,
        math.nan,
    ),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}


def as_float(value: Any) -> float:
    return math.nan if value is None or value == "" else float(value)


def _params(row: dict[str, Any]) -> dict[str, Any]:
    return json.loads(row["params"]) if isinstance(row["params"], str) else dict(row["params"])


def label(row: dict[str, Any], seed: bool = False) -> str:
    """``strategy`` and its parameters (the seed left out unless ``seed``)."""
    shown = {k: v for k, v in _params(row).items() if seed or k != "seed"}
    return row["strategy"] + "".join(f" {k}={v}" for k, v in shown.items())


def labels(rows: list[dict[str, Any]]) -> list[str]:
    """:func:`label` of each row, with the seed where rows of one strategy differ by their seed only (a
    seed sweep: each seed its own line, not one line showing the last)."""
    plain = [label(r) for r in rows]
    seeds: dict[str, set] = {}
    for name, r in zip(plain, rows):
        seeds.setdefault(name, set()).add(_params(r).get("seed"))
    return [label(r, seed=True) if len(seeds[name]) > 1 else name for name, r in zip(plain, rows)]


@functools.lru_cache(maxsize=None)
def _defaults(strategy: str) -> Optional[dict[str, str]]:
    """A strategy's default parameters, each as JSON (tuples and lists alike); ``None`` if unknown."""
    try:
        return {k: json.dumps(v, sort_keys=True) for k, v in tc.create(strategy).get_params().items()}
    except InputError:  # a strategy this version does not have, or no longer accepts its defaults
        return None


def is_default(row: dict[str, Any]) -> bool:
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


@dataclass(frozen=True)
class FlashRow:
    """What the in-model runs say about one strategy under a forced FLASH_ATTENTION backend.

    ``ran`` is false when every run was skipped (``reason`` says why); ``failed`` when a run needed eager
    attention (``reason``: the first line of its error; ``costs``: eager against SDPA per attention
    shape measured; ``ratios``: eager over SDPA time and memory at the largest of them).
    """

    strategy: str
    ran: bool
    failed: bool = False
    reason: str = ""
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratios: Optional[tuple[float, float]] = None


def flash_table(rows: list[dict[str, Any]]) -> list[FlashRow]:
    """One :class:`FlashRow` per strategy measured inside a VLM, sorted by name (the terminal's, the
    report's and the plot's FlashAttention tables)."""
    table = []
    for name, (ran, failed) in flash_measurements(rows).items():
        if not ran:
            reason = next(r["skipped"] for r in rows if r.get("flash_measured") and r["strategy"] == name)
            table.append(FlashRow(name, ran=False, reason=reason))
        elif failed is None:
            table.append(FlashRow(name, ran=True))
        else:
            table.append(
                FlashRow(
                    name,
                    ran=True,
                    failed=True,
                    reason=failed["flash_error"],
                    costs=failed.get("eager_cost") or {},
                    ratios=eager_ratios(failed),
                )
            )
    return table


def feature_order(rows: list[dict[str, Any]]) -> list[str]:
    """The feature sets of ``rows``: the in-model answers (the headline) first, the rest as they came."""
    from .vqa import VQA_FEATURES

    names = list(dict.fromkeys(r["features"] for r in rows))
    return sorted(names, key=lambda f: f != VQA_FEATURES)


def uncompressed_accuracy(rows: list[dict[str, Any]], features: str) -> list[tuple[int, float]]:
    """The uncompressed model's accuracy per question count the rows of ``features`` were measured on."""
    found = {
        int(r["n_questions"]): float(r["accuracy_uncompressed"])
        for r in rows
        if r["features"] == features and not r.get("skipped") and r.get("n_questions")
    }
    return sorted(found.items(), reverse=True)


def type_table(rows: list[dict[str, Any]], features: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Accuracy per question type, ``"compressed / uncompressed (n)"``, per configuration and budget."""
    subset = [r for r in rows if r["features"] == features and not r.get("skipped") and r.get("accuracy_by_type")]
    types = list(dict.fromkeys(t for r in subset for t in r["accuracy_by_type"]))
    body = []
    for r, name in zip(subset, labels(subset)):
        per = r["accuracy_by_type"]
        cells = [
            f"{per[t]['accuracy']:.2f} / {per[t]['accuracy_uncompressed']:.2f} ({per[t]['n']})" if t in per else "-"
            for t in types
        ]
        body.append((f"{name}, {budget_name(r['budget'])}", cells))
    return types, body


def budget_name(budget: Any) -> str:
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
    n_questions: int = 0  # the most questions a row answered (rows inside mini-llava), else 0


def metric_table(rows: list[dict[str, Any]], features: str, key: str) -> Optional[MetricTable]:
    """The table of metric ``key`` over the rows of ``features`` (``None`` when no row has it)."""
    metric = METRIC_BY_KEY[key]
    subset = [r for r in rows if r["features"] == features and not r.get("skipped")]
    if not any(not math.isnan(as_float(r.get(key))) for r in subset):
        return None
    columns = list(dict.fromkeys(r["budget"] for r in subset))
    kept_of = {b: sorted({as_float(r["kept"]) for r in subset if r["budget"] == b}) for b in columns}
    # by the tokens kept (a fraction among counts sorts where it lands), the own schedules last
    columns.sort(key=lambda b: (b is None, kept_of[b][0] if b is not None else 0, str(b)))
    kept = {}
    for b in columns:
        ks = kept_of[b]
        kept[b] = (
            "kept " + "/".join(f"{k:g}" for k in ks)
            if b is None
            else f"keep {ks[0]:g}" + (f" ({b:g})" if isinstance(b, float) else "")
            if len(ks) == 1
            else f"budget {b}"
        )
    pick = max if metric.higher_is_better else min
    best = {}
    for b in columns:
        values = [as_float(r.get(key)) for r in subset if r["budget"] == b and not math.isnan(as_float(r.get(key)))]
        best[b] = pick(values) if values else math.nan
    body = []
    names = labels(subset)
    for name in dict.fromkeys(names):
        mine = {r["budget"]: r for r, n in zip(subset, names) if n == name}
        cells: list[Optional[tuple[float, float, bool]]] = []
        for b in columns:
            r = mine.get(b)
            if r is None or math.isnan(as_float(r.get(key))):
                cells.append(None)
                continue
            value = as_float(r.get(key))
            cells.append((value, as_float(r.get(metric.ci)) if metric.ci else math.nan, value == best[b]))
        body.append((name, cells))
    n_images = int(max(as_float(r["n_images"]) for r in subset))
    return MetricTable(
        features, metric, columns, kept, body, n_images, max(int(r.get("n_questions") or 0) for r in subset)
    )


def compare(rows: list[dict[str, Any]], focus: str = DEFAULT_FOCUS) -> list[dict[str, Any]]:
    """The focus strategy (default parameters) against each reference, per feature set, budget and metric.

    The references are the registered strategies without a paper (``random``, ``pooling``). For each
    metric with per-image values the paired difference ``focus - reference`` is averaged with a 95 %
    confidence half-width; ``verdict`` says whether the focus keeps more information, less, or neither
    measurably.
    """
    references = [n for n in tc.available() if not tc.get(n).paper]
    out = []
    focus_rows = [r for r in rows if r["strategy"] == focus and is_default(r) and not r.get("skipped")]
    for fr in focus_rows:
        for ref in references:
            match = [
                r
                for r in rows
                if r["strategy"] == ref
                and r["features"] == fr["features"]
                and r["budget"] == fr["budget"]
                and not r.get("skipped")
                and is_default(r)
            ]
            if not match:
                continue
            rr = match[0]
            for key, values in (fr.get("per_image") or {}).items():
                other = (rr.get("per_image") or {}).get(key)
                if other is None or len(other) != len(values):
                    continue
                diff = np.asarray(values, dtype=float) - np.asarray(other, dtype=float)
                mean, ci = mean_ci(diff)
                better = mean > 0 if METRIC_BY_KEY[key].higher_is_better else mean < 0
                if math.isnan(ci) or abs(mean) <= ci:
                    verdict = "no measurable difference"
                else:
                    verdict = f"{focus} keeps more" if better else f"{focus} keeps less"
                out.append(
                    {
                        "features": fr["features"],
                        "budget": fr["budget"],
                        "kept": fr["kept"],
                        "metric": key,
                        "focus": float(np.mean(values)),
                        "reference": ref,
                        "reference_value": float(np.mean(other)),
                        "difference": mean,
                        "ci95": ci,
                        "n": len(diff),
                        "verdict": verdict,
                    }
                )
    return out


# ---------------------------------------------------------------- markdown
