"""The ablation grid behind ``tokencomp ablate``: strategies x parameters x budgets on real tokens."""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

import tokencomp as tc
from tokencomp.base import Compressor
from tokencomp.features import FEATURES, EfficientNetTokens, pixel_patches

from .position import position_bias
from .prediction import pred_agreement
from .retention import lstsq_error, recon_error

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_GRIDS",
    "AblationCell",
    "TokenSet",
    "expand_grid",
    "make_tokens",
    "parse_param",
    "run_ablation",
]

DEFAULT_BUDGETS = (64, 128, 192)
# ApET's variant grid (basis x error norm) runs by default; other strategies run with their defaults.
DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    "apet": {"basis": ["fps", "qr", "random"], "error_norm": ["l2", "l1", "linf", "relative"]},
}
# Context fields the image ablation can provide. Neither feature set has a [CLS] token, so
# ``cls_attention`` is a stated proxy (see :func:`mean_token_attention`).
PROVIDED_CONTEXT = ("grid", "cls_attention")
CLS_PROXY_NOTE = (
    "cls_attention is a proxy: the features have no [CLS] token, so the attention a query equal to the "
    "mean token gives, softmax(X mean(X) / sqrt(D))"
)


@dataclass
class TokenSet:
    """Visual tokens of a set of images: ``tokens`` ``[B, N, D]`` on a ``grid``."""

    name: str
    tokens: torch.Tensor
    grid: tuple[int, int]
    image_names: list[str]
    head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # classifier on a pooled token, if any

    def context(self, tokens: Optional[torch.Tensor] = None) -> tc.Context:
        """The context every strategy gets: the grid and the [CLS]-attention proxy (of ``tokens``, default
        the set's own)."""
        tokens = self.tokens if tokens is None else tokens
        return tc.Context(grid=self.grid, cls_attention=mean_token_attention(tokens))


def mean_token_attention(tokens: torch.Tensor) -> torch.Tensor:
    """A [CLS]-like attention row for features without a [CLS] token: ``softmax(X m / sqrt(D))``.

    ``m`` is the mean token of each image, standing in for the [CLS] query (a global summary of the
    image, which is what [CLS] attends from). Returns ``[B, N]`` rows summing to 1.
    """
    x = tokens.float()
    query = x.mean(dim=1, keepdim=True)  # [B, 1, D]
    return ((x @ query.transpose(1, 2)).squeeze(-1) / math.sqrt(x.shape[-1])).softmax(dim=-1)


@dataclass
class AblationCell:
    """One strategy configuration at one budget on one token set, with its measurements."""

    features: str
    strategy: str
    params: dict[str, Any]
    budget: int
    kept: int = 0
    recon_error: float = math.nan
    recon_error_ci: float = math.nan
    lstsq_error: float = math.nan
    lstsq_error_ci: float = math.nan
    time_ms: float = math.nan
    n_images: int = 0
    pred_agreement: float = math.nan
    pred_agreement_ci: float = math.nan
    pred_kl: float = math.nan
    pred_kl_ci: float = math.nan
    pred_agreement_unweighted: float = math.nan
    pred_kl_unweighted: float = math.nan
    position_bias: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """A flat dict for CSV / JSON (``params`` as a JSON string)."""
        return {
            "features": self.features,
            "strategy": self.strategy,
            "params": json.dumps(self.params, sort_keys=True),
            "budget": self.budget,
            "kept": self.kept,
            "recon_error": self.recon_error,
            "recon_error_ci95": self.recon_error_ci,
            "lstsq_error": self.lstsq_error,
            "lstsq_error_ci95": self.lstsq_error_ci,
            "pred_agreement": self.pred_agreement,
            "pred_agreement_ci95": self.pred_agreement_ci,
            "pred_kl": self.pred_kl,
            "pred_kl_ci95": self.pred_kl_ci,
            "pred_agreement_unweighted": self.pred_agreement_unweighted,
            "pred_kl_unweighted": self.pred_kl_unweighted,
            "position_bias": self.position_bias,
            "time_ms": self.time_ms,
            "n_images": self.n_images,
        }


def make_tokens(features: str, images: list[tuple[str, np.ndarray]]) -> TokenSet:
    """Tokens of ``images`` from ``features``: ``efficientnet`` (576 x 1280) or ``pixels`` (576 x 588)."""
    arrays = [img for _, img in images]
    names = [n for n, _ in images]
    if features == "efficientnet":
        extractor = EfficientNetTokens(image_size=768)
        return TokenSet(features, extractor(arrays), extractor.grid, names, head=extractor.head)
    if features == "pixels":
        return TokenSet(features, pixel_patches(arrays, image_size=336, patch=14), (24, 24), names)
    raise ValueError(f"unknown features {features!r}; allowed: {', '.join(FEATURES)}")


def parse_value(text: str) -> Any:
    """A grid value from the command line: JSON (numbers, true/false, null) or else a plain string."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.strip()


def parse_param(spec: str) -> tuple[str, str, list[Any]]:
    """Parse ``strategy.param=v1,v2,...`` into ``(strategy, param, [values])``.

    Raises
    ------
    ValueError
        When ``spec`` does not have that form.
    """
    head, sep, values = spec.partition("=")
    strategy, dot, param = head.partition(".")
    if not sep or not dot or not strategy.strip() or not param.strip() or not values.strip():
        raise ValueError(
            f"malformed parameter grid {spec!r}; expected STRATEGY.PARAM=V1,V2,... "
            "e.g. apet.basis=fps,qr,random"
        )
    return strategy.strip(), param.strip(), [parse_value(v) for v in values.split(",")]


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """All combinations of a ``{param: [values]}`` grid, in a fixed order."""
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def runnable(cls: type[Compressor]) -> Optional[str]:
    """Why the image ablation cannot run ``cls`` (``None`` when it can)."""
    if cls.stage != "pre_llm":
        return f"runs inside the language model (stage={cls.stage!r}); no LLM in the image ablation"
    missing = [f for f in cls.requires if f not in PROVIDED_CONTEXT]
    if missing:
        return f"needs context {', '.join(missing)}, which the image ablation does not provide"
    return None


def _mean_ci(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    n = v.numel()
    mean = float(v.mean())
    ci = float(1.96 * v.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return mean, ci


def configurations(
    strategies: Iterable[str], grids: dict[str, dict[str, list[Any]]], seed: int
) -> list[tuple[str, dict[str, Any]]]:
    """``(strategy, params)`` pairs: each strategy's grid expanded, ``seed`` set where it takes one.

    Raises
    ------
    InvalidParameterError
        A grid names a parameter the strategy does not take, or a value it refuses.
    """
    configs = []
    for name in strategies:
        cls = tc.get(name)
        for params in expand_grid(grids.get(name, {})):
            if "seed" in cls._param_names() and "seed" not in params:
                params = {**params, "seed": seed}
            tc.create(name, **params)  # validates now, before any work is done
            configs.append((name, params))
    return configs


def run_ablation(
    token_sets: list[TokenSet],
    configs: list[tuple[str, dict[str, Any]]],
    budgets: Iterable[int | float],
    on_cell: Optional[Callable[[AblationCell], None]] = None,
) -> list[AblationCell]:
    """Compress every token set with every configuration at every budget and measure retention.

    Each configuration compresses all images of a token set as one batch. ``recon_error`` and
    ``lstsq_error`` are means over images with a 95 % confidence half-width (``1.96 sd / sqrt(n)``);
    ``pred_agreement`` / ``pred_kl`` where the token set has a classifier head; ``position_bias`` from one
    content shuffle per image (:func:`tokencomp.analysis.position_bias`).
    """
    cells = []
    for ts in token_sets:
        context = ts.context()
        for (name, params), budget in itertools.product(configs, budgets):
            comp = tc.create(name, **params)
            start = time.perf_counter()
            result = comp.compress(ts.tokens, budget, context)
            elapsed = (time.perf_counter() - start) * 1000
            rec_mean, rec_ci = _mean_ci(recon_error(ts.tokens, result))
            ls_mean, ls_ci = _mean_ci(lstsq_error(ts.tokens, result))
            cell = AblationCell(
                features=ts.name,
                strategy=name,
                params=params,
                budget=budget,
                kept=result.kept,
                recon_error=rec_mean,
                recon_error_ci=rec_ci,
                lstsq_error=ls_mean,
                lstsq_error_ci=ls_ci,
                time_ms=elapsed,
                n_images=ts.tokens.shape[0],
            )
            cell.position_bias = position_bias(comp, ts.tokens, budget, context=ts.context, repeats=1, seed=0)
            if ts.head is not None:
                weighted = pred_agreement(ts.head, ts.tokens, result, weighted=True)
                plain = pred_agreement(ts.head, ts.tokens, result, weighted=False)
                cell.pred_agreement, cell.pred_agreement_ci = _mean_ci(weighted["agree"])
                cell.pred_kl, cell.pred_kl_ci = _mean_ci(weighted["kl"])
                cell.pred_agreement_unweighted = float(plain["agree"].mean())
                cell.pred_kl_unweighted = float(plain["kl"].mean())
            cells.append(cell)
            if on_cell is not None:
                on_cell(cell)
    return cells
