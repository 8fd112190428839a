"""Strategies inside a vision-language model: agreement with the uncompressed model, where the kept tokens
sit, and whether the strategy runs under FlashAttention, measured.

Every measurement runs a real ``transformers`` VLM through :func:`tokencomp.apply`, one image per prompt
row. By default the model is :func:`~tokencomp.analysis.tiny_vlm.tiny_llava` at LLaVA-1.5's shape of
visual input (336 px, 576 tokens, a 32-layer decoder): random weights, so its answers mean nothing,
but every code path (the vision tower's [CLS] row, the decoder's attention at a layer, the cut
sequence) is the real one. Pass a real checkpoint to :func:`run_vlm` for figures that mean something.

- **Agreement**: the next-token distribution after the prompt, compressed against uncompressed:
  top-1 agreement and ``KL(full || compressed)`` (nats), per image.
- **Position bias**: the image's 14 px patches are shuffled over the grid (a permutation per image), so
  the content no longer says where a token sits; the kept visual positions, composed over every stage,
  are compared with the uniform distribution (1-D Wasserstein distance, as
  :func:`tokencomp.analysis.position_bias`).
- **FlashAttention**: the compressed forward runs under ``torch.nn.attention.sdpa_kernel`` forcing the
  FLASH_ATTENTION backend, without eager fallback. It works, or it raises (the strategy reads attention
  weights a fused kernel never returns); then the run is repeated with ``allow_eager_fallback=True``
  and :func:`attention_cost` measures what the eager layer costs against SDPA at the same length.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, cast

import numpy as np
import torch

import tokencomp as tc
from tokencomp.analysis.features import CLIP_MEAN, CLIP_STD, normalised_images
from tokencomp.base import Compressor
from tokencomp.errors import AttentionUnavailableError, InputError
from tokencomp.types import CompressionResult

from .measure import peak_memory, time_ms, timed
from .position import kept_heatmap, uniform_distance
from .results import EAGER_KEYS, Row, mean_ci

__all__ = [
    "AttentionShape",
    "LLAVA_7B_SHAPES",
    "VLMCell",
    "agreement",
    "apply_point",
    "eager_costs",
    "largest_cost",
    "text_conditioned",
    "attention_cost",
    "eager_kind",
    "llava_inputs",
    "model_shape",
    "next_token_logprobs",
    "record_kept",
    "run_vlm",
    "shuffle_patches",
]


# ---------------------------------------------------------------- inputs
def llava_inputs(
    model: Any, images: list[np.ndarray], seed: int = 0, text_before: int = 3, text_after: int = 8
) -> dict:
    """One prompt row per image for a LLaVA-layout model: ``input_ids``, ``attention_mask``, ``pixel_values``.

    Each row is ``<bos>``, ``text_before`` words, the image's placeholder tokens, ``text_after`` words
    (the same random words in every row, from ``seed``). Pixels are centre-cropped, resized to the
    tower's size and CLIP-normalised.
    """
    cfg = model.config
    size, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    n = (size // patch) ** 2
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.text_config.vocab_size
    high = min(vocab, cfg.image_token_id)
    words = torch.randint(3, high, (text_before + text_after,), generator=g).tolist()
    row = [1] + words[:text_before] + [cfg.image_token_id] * n + words[text_before:]
    ids = torch.tensor([row] * len(images))
    pixels = normalised_images(images, size, CLIP_MEAN, CLIP_STD)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def shuffle_patches(pixels: torch.Tensor, patch: int, generator: torch.Generator) -> torch.Tensor:
    """Permute the ``patch`` x ``patch`` squares of each image ``[B, 3, S, S]`` over its grid (one
    permutation per image); the content of each square is unchanged."""
    b, c, s, _ = pixels.shape
    if s % patch:
        raise InputError(f"shuffle_patches: image side {s} is not a multiple of patch={patch}")
    g = s // patch
    blocks = pixels.reshape(b, c, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
    perm = torch.rand(b, g * g, generator=generator).argsort(dim=1)
    blocks = blocks.gather(1, perm[..., None].expand_as(blocks))
    return blocks.reshape(b, g, g, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(b, c, s, s).contiguous()


# ---------------------------------------------------------------- what was kept
class KeptLog:
    """Original visual positions kept by the stages of one forward, composed (``positions`` ``[B, K]``)."""

    def __init__(self) -> None:
        self.positions: Optional[torch.Tensor] = None
        self.calls = 0

    def add(self, result: CompressionResult) -> None:
        idx = result.indices if result.indices.dim() == 2 else result.indices[None]
        idx = idx.detach().cpu()
        self.positions = idx if self.positions is None else self.positions.gather(1, idx)
        self.calls += 1


@contextlib.contextmanager
def record_kept(compressors: Iterable[Compressor]) -> Iterator[KeptLog]:
    """Record (and compose) the indices every call of ``compressors``' ``compress`` returns, in call order."""
    log = KeptLog()
    patched = []
    for comp in compressors:
        original = comp.compress

        def recording(tokens, budget, context=None, _original=original):
            result = _original(tokens, budget, context)
            log.add(result)
            return result

        comp.compress = recording  # type: ignore[method-assign]
        patched.append(comp)
    try:
        yield log
    finally:
        for comp in patched:
            del comp.compress


@torch.no_grad()
def next_token_logprobs(model: Any, inputs: dict) -> torch.Tensor:
    """``[B, V]`` float32 log-probabilities of the token after the prompt."""
    return model(**inputs).logits[:, -1].float().log_softmax(dim=-1)


# ---------------------------------------------------------------- eager against SDPA
@dataclass(frozen=True)
class AttentionShape:
    """An attention call: ``heads`` x ``head_dim`` over ``length`` positions, ``batch`` rows."""

    label: str
    heads: int
    head_dim: int
    length: int
    batch: int = 1
    causal: bool = True


class _AttentionModule(torch.nn.Module):
    """The attributes transformers' attention functions read from their module."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.num_key_value_groups = 1
        self.is_causal = causal


def attention_cost(shape: AttentionShape, repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Time and peak memory of transformers' eager attention against its SDPA attention at ``shape``.

    Both are the functions a transformers model switches between (``eager_attention_forward``, which
    materialises the ``[B, H, L, L]`` weights, and ``sdpa_attention_forward``), called on the same random
    queries, keys and values. Times are the minimum over ``repeats`` (ms); peaks are measured by
    :func:`peak_memory` (MiB). The two outputs are checked to agree.

    Returns
    -------
    dict
        ``eager_ms``, ``sdpa_ms``, ``eager_peak_mib``, ``sdpa_peak_mib``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape.batch, shape.heads, shape.length, shape.head_dim, generator=g) for _ in range(3))
    module = _AttentionModule(shape.causal).eval()
    scaling = shape.head_dim**-0.5
    mask = None
    if shape.causal:
        mask = torch.full((shape.length, shape.length), float("-inf")).triu(1)[None, None]

    def eager():
        return eager_attention_forward(module, q, k, v, mask, scaling=scaling)[0]

    def sdpa():
        return sdpa_attention_forward(module, q, k, v, None, scaling=scaling, is_causal=shape.causal)[0]

    result: dict[str, float] = {}
    outputs = {}
    with torch.no_grad():
        for name, fn in (("eager", eager), ("sdpa", sdpa)):
            result[f"{name}_ms"] = time_ms(fn, repeats, long_ms=math.inf)
            outputs[name], peak = peak_memory(fn)
            result[f"{name}_peak_mib"] = peak / 2**20
    if not torch.allclose(outputs["eager"], outputs["sdpa"], atol=1e-4, rtol=1e-3):
        raise RuntimeError("attention_cost: eager and SDPA attention disagree; the comparison would be meaningless")
    return result


# ---------------------------------------------------------------- the grid
def agreement(full: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``[Q, V]`` log-probabilities: top-1 agreement with ``full`` (the uncompressed model's) and
    ``KL(full || logprobs)`` (rounding below zero read as zero)."""
    agree = (logprobs.argmax(-1) == full.argmax(-1)).float()
    kl = (full.exp() * (full - logprobs)).sum(-1).clamp(min=0)
    return agree, kl


def eager_costs(
    cache: dict[AttentionShape, dict[str, float]], shapes: list[AttentionShape]
) -> dict[str, dict[str, Any]]:
    """Eager against SDPA per attention shape, by its label; each shape timed once and kept in ``cache``."""
    for shape in shapes:
        if shape not in cache:
            cache[shape] = attention_cost(shape)
    return {s.label: {"length": s.length, "heads": s.heads, "head_dim": s.head_dim, **cache[s]} for s in shapes}


def largest_cost(costs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The :data:`~tokencomp.analysis.results.EAGER_KEYS` of the largest shape in :func:`eager_costs`."""
    largest = max(costs.values(), key=lambda c: c["heads"] * c["head_dim"] * c["length"])
    return {k: largest[k] for k in EAGER_KEYS}


@dataclass
class VLMCell:
    """One strategy configuration at one budget inside a VLM, with its measurements."""

    strategy: str
    params: dict[str, Any]
    budget: Optional[int | float]
    kept: float = math.nan
    next_token_agreement: float = math.nan
    next_token_agreement_ci: float = math.nan
    logit_kl: float = math.nan
    logit_kl_ci: float = math.nan
    position_bias: float = math.nan
    flash_compatible: Optional[bool] = None
    flash_error: str = ""
    time_ms: float = math.nan
    eager_cost: dict[str, Any] = field(default_factory=dict)
    heatmap: Optional[torch.Tensor] = None  # [N] share of images keeping each visual position
    example_kept: Optional[list[int]] = None  # kept visual positions of the first image
    per_image: dict[str, list[float]] = field(default_factory=dict)
    n_images: int = 0
    skipped: str = ""

    def row(self, features: str) -> Row:
        """A results row (see :mod:`tokencomp.analysis.results`); eager costs at the largest measured shape."""
        row: Row = {
            "features": features,
            "strategy": self.strategy,
            "params": self.params,
            "budget": self.budget,
            "kept": self.kept,
            "n_images": self.n_images,
            "time_ms": self.time_ms,
            "skipped": self.skipped,
            "next_token_agreement": self.next_token_agreement,
            "next_token_agreement_ci95": self.next_token_agreement_ci,
            "logit_kl": self.logit_kl,
            "logit_kl_ci95": self.logit_kl_ci,
            "position_bias": self.position_bias,
            "flash_compatible": self.flash_compatible,
            "flash_error": self.flash_error,
            "flash_measured": True,
            "eager_cost": self.eager_cost,
            "per_image": self.per_image,
            "example_kept": self.example_kept,
            "heatmap": None if self.heatmap is None else [round(float(v), 4) for v in self.heatmap],
        }
        if self.heatmap is not None:
            side = math.isqrt(self.heatmap.numel())
            row["grid"] = [side, side] if side * side == self.heatmap.numel() else None
        if self.eager_cost:
            cast(dict, row).update(largest_cost(self.eager_cost))
        return row


def eager_kind(cls: type[Compressor]) -> str:
    """Where ``cls`` needs eager attention: ``"vision tower"`` (its [CLS] row) or ``"decoder layer"``."""
    return "vision tower" if "cls_attention" in cls.requires else "decoder layer"


def model_shape(kind: str, model: Any, length: int) -> AttentionShape:
    """The attention shape of ``model``'s vision tower or decoder layer (``length`` positions)."""
    if kind == "vision tower":
        v = model.config.vision_config
        n = (v.image_size // v.patch_size) ** 2 + 1
        return AttentionShape(
            f"this model's {kind}", v.num_attention_heads, v.hidden_size // v.num_attention_heads, n, causal=False
        )
    t = model.config.text_config
    return AttentionShape(f"this model's {kind}", t.num_attention_heads, t.hidden_size // t.num_attention_heads, length)


# LLaVA-1.5-7B's attention shapes: CLIP ViT-L/14 at 336 px (577 positions, 16 heads of 64) and its
# Vicuna-7B decoder (32 heads of 128) over 576 visual tokens and a short prompt.
LLAVA_7B_SHAPES = {
    "vision tower": AttentionShape("LLaVA-1.5-7B vision tower", 16, 64, 577, causal=False),
    "decoder layer": AttentionShape("LLaVA-1.5-7B decoder layer", 32, 128, 640),
}


def text_conditioned(comp: Compressor) -> bool:
    """Whether ``comp`` reads the instruction (scores the tokens against its embeddings)."""
    return "text_embeddings" in comp.requires


def apply_point(comp: Compressor) -> Optional[str]:
    """The ``point`` the in-model views give :func:`tokencomp.apply`: text-conditioned pre-LLM strategies
    score the tokens against the instruction's embeddings, which live in the language model's space, so
    they act after the projector; every other strategy at its integration's default."""
    return "post_projector" if comp.stage == "pre_llm" and text_conditioned(comp) else None


def budget_runs(
    name: str, params: dict[str, Any], budgets: list[int | float]
) -> list[tuple[dict[str, Any], Any, Any, str]]:
    """``(params, budget for apply, budget of the row, why it cannot run or "")`` per requested budget.

    Strategies that set their own per-layer budgets (``stage_budgets``) take the budget through their
    ``budget_param`` when they declare one and accept that value (SparseVLM's ``retained``), else run once
    with their own schedule (row budget ``None``).
    """
    cls = tc.get(name)
    if not tc.create(name, **params).sets_own_budgets():
        return [(params, b, b, "") for b in budgets]
    key = cls.budget_param
    if not key or key in params:
        return [(params, None, None, "")]
    runs = []
    for b in budgets:
        reason = ""
        try:
            tc.create(name, **{**params, key: b})
        except InputError as exc:  # a budget the strategy's schedule does not define
            reason = str(exc)
        runs.append(({**params, key: b}, None, b, reason))
    return runs


def run_vlm(
    model: Any,
    images: list[np.ndarray],
    configs: list[tuple[str, dict[str, Any]]],
    budgets: Iterable[int | float],
    seed: int = 0,
    real_shapes: Optional[dict[str, AttentionShape]] = None,
    on_cell: Optional[Callable[[VLMCell], None]] = None,
    skip: Optional[Callable[[str, dict[str, Any], Any], bool]] = None,
) -> list[VLMCell]:
    """Run every configuration at every budget inside ``model`` on ``images`` (one row per image).

    Parameters
    ----------
    model : transformers model
        A LLaVA-layout model :func:`tokencomp.apply` supports, loaded with SDPA attention.
    images : list of ndarray
        ``[H, W, 3]`` uint8 images.
    configs : list of (str, dict)
        ``(strategy, params)`` pairs.
    budgets : iterable of int or float
        Visual tokens kept per image.
    seed : int
        Seed of the prompt words and of the patch shuffles.
    real_shapes : dict, optional
        Per kind (``"vision tower"``, ``"decoder layer"``), a further shape at which to measure eager
        against SDPA for the strategies that need eager attention (default :data:`LLAVA_7B_SHAPES`); the
        model's own shape is always measured.

    Returns
    -------
    list of VLMCell
        In the order of ``configs`` x ``budgets``; a configuration the model cannot run has ``skipped`` set.
    """
    if type(model).__name__ != "LlavaForConditionalGeneration":
        raise TypeError(
            f"run_vlm: builds LLaVA-1.5 prompts (one image per row); got a {type(model).__name__}. "
            "Pass a LlavaForConditionalGeneration (e.g. tiny_llava(), or llava-hf/llava-1.5-7b-hf loaded with "
            "from_pretrained), or call tokencomp.apply on your own model and inputs."
        )
    budgets = list(budgets)
    bench = _Bench(model, images, seed, LLAVA_7B_SHAPES if real_shapes is None else real_shapes)
    cells: list[VLMCell] = []
    for name, base_params in configs:
        for params, budget, row_budget, reason in budget_runs(name, base_params, budgets):
            if skip is not None and skip(name, params, row_budget):
                continue
            cell = VLMCell(strategy=name, params=params, budget=row_budget, n_images=len(images), skipped=reason)
            if not reason:
                bench.measure(cell, tc.create(name, **params), budget)
            cells.append(cell)
            if on_cell is not None:
                on_cell(cell)
    return cells


class _Bench:
    """One model on one set of images: its uncompressed next-token distribution, the patch-shuffled
    images for the position bias, and the eager / SDPA costs measured so far (each shape once)."""

    def __init__(self, model: Any, images: list[np.ndarray], seed: int, real_shapes: dict[str, AttentionShape]) -> None:
        self.model, self.real_shapes = model, real_shapes
        self.inputs = llava_inputs(model, images, seed=seed)
        pixels = shuffle_patches(
            self.inputs["pixel_values"], model.config.vision_config.patch_size, torch.Generator().manual_seed(seed)
        )
        self.shuffled = dict(self.inputs, pixel_values=pixels)
        self.n_visual = int((self.inputs["input_ids"][0] == model.config.image_token_id).sum())
        self.length = self.inputs["input_ids"].shape[1]
        self.full = next_token_logprobs(model, self.inputs)
        self.costs: dict[AttentionShape, dict[str, float]] = {}

    def _run(self, comp: Compressor, budget: Any, batch: dict, fallback: bool) -> tuple[torch.Tensor, KeptLog, float]:
        """Next-token log-probabilities of ``batch`` with ``comp`` applied under a forced FLASH_ATTENTION
        backend, the kept positions and the prefill's time."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        point = apply_point(comp)
        with record_kept([comp]) as log, sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            with tc.apply(self.model, comp, budget=budget, point=point, allow_eager_fallback=fallback):
                logprobs, elapsed = timed(lambda: next_token_logprobs(self.model, batch))
        return logprobs, log, elapsed

    def measure(self, cell: VLMCell, comp: Compressor, budget: Any) -> None:
        """Fill ``cell`` with ``comp``'s measurements at ``budget`` (or why the strategy refused)."""
        try:
            try:
                logprobs, log, elapsed = self._run(comp, budget, self.inputs, fallback=False)
                cell.flash_compatible = True
            except AttentionUnavailableError as exc:  # any other error is a bug: it propagates
                cell.flash_compatible, cell.flash_error = False, str(exc).split("\n")[0]
                logprobs, log, elapsed = self._run(comp, budget, self.inputs, fallback=True)
            shuffled_log = self._run(comp, budget, self.shuffled, fallback=not cell.flash_compatible)[1]
        except InputError as exc:  # the strategy refuses this input (it says why); a bug propagates
            cell.skipped = str(exc).split("\n")[0]
            return
        cell.time_ms = elapsed
        self._agreement(cell, logprobs, log.positions)
        if shuffled_log.positions is not None:
            cell.position_bias = uniform_distance(shuffled_log.positions, self.n_visual)
        if not cell.flash_compatible:
            self._eager_cost(cell, eager_kind(type(comp)))

    def _agreement(self, cell: VLMCell, logprobs: torch.Tensor, kept: Optional[torch.Tensor]) -> None:
        """Next-token agreement and KL against the uncompressed model, and where the kept tokens lie."""
        cell.kept = float(kept.shape[1]) if kept is not None else float(self.n_visual)
        agree, kl = agreement(self.full, logprobs)
        cell.next_token_agreement, cell.next_token_agreement_ci = mean_ci(agree)
        cell.logit_kl, cell.logit_kl_ci = mean_ci(kl)
        cell.per_image = {"next_token_agreement": agree.tolist(), "logit_kl": kl.tolist()}
        if kept is not None:
            cell.heatmap = kept_heatmap(kept, self.n_visual)
            cell.example_kept = kept[0].tolist()

    def _eager_cost(self, cell: VLMCell, kind: str) -> None:
        """Eager against SDPA at this model's shape and the real one for ``kind``, each shape timed once."""
        shapes = [model_shape(kind, self.model, self.length)] + (
            [self.real_shapes[kind]] if kind in self.real_shapes else []
        )
        cell.eager_cost = eager_costs(self.costs, shapes)
