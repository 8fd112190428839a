"""The ablation grid behind ``tokencomp ablate``: strategies x parameters x budgets on real tokens."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Container, Iterable, Optional

import numpy as np
import torch

import tokencomp as tc
from tokencomp.analysis.features import (
    FEATURES,
    EfficientNetTokens,
    HFVisionTokens,
    dinov2_tokens,
    is_hf,
    pixel_patches,
)
from tokencomp.base import Compressor
from tokencomp.errors import InputError

from .grid import DEFAULT_GRIDS, DEFAULT_VIEWS, VIEWS
from .measure import timed
from .position import kept_heatmap, position_bias
from .prediction import pred_agreement
from .results import Row, cell_key, mean_ci
from .retention import lstsq_error, recon_error

__all__ = [
    "DEFAULT_GRIDS",
    "TokenSet",
    "DEFAULT_VIEWS",
    "VIEWS",
    "expand_grid",
    "image_views",
    "make_tokens",
    "measure_cell",
    "parse_param",
    "run_ablation",
]

# Context fields the image ablation can provide. EfficientNet and pixel tokens have no [CLS] token, so
# there ``cls_attention`` is a stated proxy (see :func:`mean_token_attention`); dinov2 and hf: towers with
# a [CLS] token give the real row.
PROVIDED_CONTEXT = ("grid", "cls_attention")
CLS_PROXY_NOTE = (
    "cls_attention is a proxy: the features have no [CLS] token, so the attention a query equal to the "
    "mean token gives, softmax(X mean(X) / sqrt(D))"
)


@dataclass
class TokenSet:
    """Visual tokens of a set of images: ``tokens`` ``[B, N, D]`` on a ``grid``.

    ``view_of[i]`` is the index of the original image view ``i`` was made from (``B`` may hold several
    crops and flips of each image); ``cls_attention`` is a real [CLS] row when the feature extractor has
    one (a CLIP tower), else the context uses :func:`mean_token_attention`.
    """

    name: str
    tokens: torch.Tensor
    grid: tuple[int, int]
    image_names: list[str]
    head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # classifier on a pooled token, if any
    cls_attention: Optional[torch.Tensor] = None
    view_of: Optional[torch.Tensor] = None

    @property
    def originals(self) -> torch.Tensor:
        """Indices of the unaugmented views (the first view of each image)."""
        if self.view_of is None:
            return torch.arange(self.tokens.shape[0])
        first = torch.ones_like(self.view_of, dtype=torch.bool)
        first[1:] = self.view_of[1:] != self.view_of[:-1]
        return first.nonzero().flatten()

    def context(
        self,
        tokens: Optional[torch.Tensor] = None,
        perm: Optional[torch.Tensor] = None,
        rows: Optional[torch.Tensor] = None,
    ) -> tc.Context:
        """The context every strategy gets: the grid and a [CLS] row, for ``tokens`` (default the set's
        own), the rows ``rows`` of the set, their positions permuted by ``perm`` ``[B, N]`` when given."""
        tokens = self.tokens if tokens is None else tokens
        if self.cls_attention is None:
            return tc.Context(grid=self.grid, cls_attention=mean_token_attention(tokens))
        cls = self.cls_attention if rows is None else self.cls_attention[rows]
        if perm is not None:
            cls = cls.gather(1, perm)
        return tc.Context(grid=self.grid, cls_attention=cls)


def mean_token_attention(tokens: torch.Tensor) -> torch.Tensor:
    """A [CLS]-like attention row for features without a [CLS] token: ``softmax(X m / sqrt(D))``.

    ``m`` is the mean token of each image, standing in for the [CLS] query (a global summary of the
    image, which is what [CLS] attends from). Returns ``[B, N]`` rows summing to 1.
    """
    x = tokens.float()
    query = x.mean(dim=1, keepdim=True)  # [B, 1, D]
    return ((x @ query.transpose(1, 2)).squeeze(-1) / math.sqrt(x.shape[-1])).softmax(dim=-1)


def _crop(img: np.ndarray, where: str) -> np.ndarray:
    """80 % of each side of ``img``: centred (``crop``), at the top-left or the bottom-right corner."""
    h, w = img.shape[:2]
    ch, cw = round(h * 0.8), round(w * 0.8)
    top, left = {"crop": ((h - ch) // 2, (w - cw) // 2), "crop-tl": (0, 0), "crop-br": (h - ch, w - cw)}[where]
    return np.ascontiguousarray(img[top : top + ch, left : left + cw])


def image_views(
    images: list[tuple[str, np.ndarray]], views: Iterable[str] = DEFAULT_VIEWS
) -> list[tuple[str, np.ndarray, int]]:
    """Each image as several views ``(name/view, array, image index)``: ``full``; ``flip`` (mirrored left to
    right); ``crop`` / ``crop-tl`` / ``crop-br`` (80 % of each side, centred or at the top-left or
    bottom-right corner, i.e. zoomed in). Views of an image are consecutive.

    Raises
    ------
    ValueError
        An unknown view name.
    """
    views = list(views)
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise InputError(f"unknown image views {unknown or views!r}; allowed: {', '.join(VIEWS)}")
    out = []
    for i, (name, img) in enumerate(images):
        for view in views:
            if view == "full":
                arr = img
            elif view == "flip":
                arr = np.ascontiguousarray(img[:, ::-1])
            else:
                arr = _crop(img, view)
            out.append((f"{name}/{view}" if view != "full" else name, arr, i))
    return out


def make_tokens(features: str, images: list[tuple[str, np.ndarray]], views: Iterable[str] = DEFAULT_VIEWS) -> TokenSet:
    """Tokens of ``images`` from ``features``.

    ``efficientnet``: 576 x 1280 from the pretrained ImageNet network, with its classifier as the head,
    on every view in ``views`` (crops and flips give the prediction read-out more samples); ``pixels``:
    576 x 588 raw patches; ``dinov2``: 576 x 384 from mini-llava's pretrained DINOv2 ViT-S/14 at 336 px
    with its last layer's real [CLS] attention; ``hf:MODEL``: a CLIP / SigLIP / DINOv2 / ViT tower's patch
    tokens and, where it has a [CLS] token, its real [CLS] attention. Views apply to feature sets with a
    head only.
    """
    if features == "efficientnet":
        extractor = EfficientNetTokens(image_size=768)
        viewed = image_views(images, views)
        tokens = extractor([a for _, a, _ in viewed])
        return TokenSet(
            features,
            tokens,
            extractor.grid,
            [n for n, _, _ in viewed],
            head=extractor.head,
            view_of=torch.tensor([i for _, _, i in viewed]),
        )
    names = [n for n, _ in images]
    arrays = [img for _, img in images]
    if features == "pixels":
        return TokenSet(features, pixel_patches(arrays, image_size=336, patch=14), (24, 24), names)
    if is_hf(features) or features == "dinov2":
        extractor = HFVisionTokens(features[3:]) if is_hf(features) else dinov2_tokens()
        tokens, cls = extractor.encode(arrays)
        return TokenSet(features, tokens, extractor.grid, names, cls_attention=cls)
    raise InputError(f"unknown features {features!r}; allowed: {', '.join(FEATURES)} or hf:MODEL")


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
        raise InputError(
            f"malformed parameter grid {spec!r}; expected STRATEGY.PARAM=V1,V2,... e.g. apet.basis=fps,qr,random"
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


def _rounded(values: torch.Tensor, digits: int = 5) -> list[float]:
    return [round(float(v), digits) for v in values.flatten()]


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


def measure_cell(ts: TokenSet, name: str, params: dict[str, Any], budget: int | float) -> Row:
    """One strategy configuration at one budget on a token set: a results row (see
    :mod:`tokencomp.analysis.results`).

    ``recon_error`` and ``lstsq_error`` (and ``pred_agreement`` / ``pred_kl`` where the token set has a
    classifier head) are means over every view with a 95 % confidence half-width (``1.96 sd / sqrt(n)``),
    the per-view values kept in ``per_image``; ``position_bias`` from one content shuffle of each original
    image (:func:`tokencomp.analysis.position_bias`); ``heatmap`` the share of original images keeping each
    position; ``example_kept`` the first image's kept positions.
    """
    comp = tc.create(name, **params)
    context = ts.context()
    result, elapsed = timed(lambda: comp.compress(ts.tokens, budget, context))
    recon, lstsq = recon_error(ts.tokens, result), lstsq_error(ts.tokens, result)
    row: Row = {
        "features": ts.name,
        "strategy": name,
        "params": params,
        "budget": budget,
        "kept": result.kept,
        "n_images": ts.tokens.shape[0],
        "time_ms": elapsed,
        "grid": list(ts.grid),
        "flash_measured": False,
    }
    row["recon_error"], row["recon_error_ci95"] = mean_ci(recon)
    row["lstsq_error"], row["lstsq_error_ci95"] = mean_ci(lstsq)
    per_image = {"recon_error": _rounded(recon), "lstsq_error": _rounded(lstsq)}
    orig = ts.originals
    row["heatmap"] = _rounded(kept_heatmap(result.indices[orig], ts.tokens.shape[1]), 4)
    row["example_kept"] = result.indices[0].tolist()
    row["position_bias"] = position_bias(
        comp, ts.tokens[orig], budget, context=lambda t, p: ts.context(t, p, rows=orig), repeats=1, seed=0
    )
    if ts.head is not None:
        weighted = pred_agreement(ts.head, ts.tokens, result, weighted=True)
        plain = pred_agreement(ts.head, ts.tokens, result, weighted=False)
        row["pred_agreement"], row["pred_agreement_ci95"] = mean_ci(weighted["agree"])
        row["pred_kl"], row["pred_kl_ci95"] = mean_ci(weighted["kl"])
        row["pred_agreement_unweighted"] = float(plain["agree"].mean())
        row["pred_kl_unweighted"] = float(plain["kl"].mean())
        per_image["pred_agreement"] = _rounded(weighted["agree"])
        per_image["pred_kl"] = _rounded(weighted["kl"])
    row["per_image"] = per_image
    return row


def run_ablation(
    token_sets: list[TokenSet],
    configs: list[tuple[str, dict[str, Any]]],
    budgets: Iterable[int | float],
    on_cell: Optional[Callable[[Row], None]] = None,
    done: Container = (),
) -> list[Row]:
    """Every token set x configuration x budget through :func:`measure_cell`; cells whose
    :func:`~tokencomp.analysis.results.cell_key` is in ``done`` are skipped (``--resume``).

    Each configuration compresses all images of a token set as one batch.
    """
    rows = []
    for ts in token_sets:
        for (name, params), budget in itertools.product(configs, budgets):
            if cell_key(ts.name, name, params, budget) in done:
                continue
            row = measure_cell(ts, name, params, budget)
            rows.append(row)
            if on_cell is not None:
                on_cell(row)
    return rows
