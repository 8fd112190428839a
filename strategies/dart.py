"""DART: keep a few pivot tokens and, for each, the tokens that duplicate it least.

Paper: Wen et al., *Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More* (DART), EMNLP 2025 (arXiv 2502.11494). Authors' code: ``ZichenWen1/DART``
(``get_retained_image_token`` and the ``DART`` LLaMA model that calls it at layer ``K``). Their
LLaVA-1.5 defaults: ``K = 2``, ``pivot_image_token = 4``, ``pivot_text_token = 4``,
``max_num_trunction`` = the number of image tokens to keep beyond the image pivots.

The algorithm at LLM layer ``K`` (:class:`DARTLLM`, ``dart-llm``), at prefill:

1. **Pivots.** The keys that layer ``K - 1`` produced, heads concatenated, give every token an L1 norm.
   The ``pivot_image_tokens`` image tokens and the ``pivot_text_tokens`` tokens after the image (the
   instruction) of largest key norm are the pivots.
2. **Quota.** Each of the ``P = pivot_image_tokens + pivot_text_tokens`` pivots claims
   ``max_num_trunction // P`` image tokens.
3. **Duplicate removal.** Pivot by pivot, among the image tokens neither pivots nor already claimed,
   the pivot claims the ones **least** cosine-similar to it (``topk`` of ``-cos``), measured on the
   hidden states leaving layer ``K - 1`` after the model's final norm.
4. **Keep** the image pivots and every claimed token, in their original order; drop the rest (no
   merging). The text pivots only steer; they are not image tokens and stay in the sequence anyway.

Before the language model (:class:`DART`, ``dart``) the same rule runs on the vision features with
image pivots only: the ``pivot_image_tokens`` features of largest L1 norm, and cosine similarity
between the features themselves.

Departures, all stated:

- **Exact budget.** The authors keep ``P_img + P * (max_num_trunction // P)`` tokens, which is rarely
  the requested count. We keep exactly ``k``: the ``k - P_img`` claims are split as evenly as possible,
  the first ``(k - P_img) mod P`` pivots claiming one more. With ``k = P_img + P * t`` this is their
  rule with ``max_num_trunction = P * t``.
- **Pivot order.** The authors iterate over a Python ``set`` of positions, whose order is CPython's
  hash-table layout. We iterate in a documented order: image pivots by descending key norm, then text
  pivots by descending key norm.
- Ties (equal norms, equal similarities) go to the lower position: stable sorts instead of the authors'
  ``topk``, which leaves their order unspecified.
- Maths in float32; batched over ``B`` (the authors handle batch row 0 only).
"""

from __future__ import annotations

from typing import Optional

import torch

from tokencomp.base import Compressor
from tokencomp.constraints import Interval
from tokencomp.errors import InputError, InvalidParameterError
from tokencomp.kernels import batched_gather, row_blocks, rows_matmul, selection_result
from tokencomp.kernels.attention import rank_descending
from tokencomp.kernels.blocks import scaled_norms, unit_vectors
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context


def claim_quotas(claims: int, pivots: int) -> list[int]:
    """Split ``claims`` image tokens over ``pivots`` pivots: as even as possible, the first ones first."""
    base, extra = divmod(claims, pivots)
    return [base + (1 if p < extra else 0) for p in range(pivots)]


def _l1_norms(x: torch.Tensor, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """L1 norms in float32 over ``dims`` of ``x``, with the row axis (``-2``) walked in blocks.

    The same sum as ``x.float().abs().sum(dims)`` (bit for bit: each row's sum is reduced alone), without
    the two full-size temporaries that expression allocates. ``x`` is ``[B, N, D]`` (``dims=(-1,)``) or
    ``[B, H, L, Dh]`` keys (``dims=(1, 3)``, the heads-concatenated key).
    """
    rows = x.shape[-2]
    width = x.numel() // max(1, x.shape[0] * rows)
    out = torch.empty(x.shape[0], rows, dtype=torch.float32, device=x.device)
    for blk in row_blocks(x.shape[0], rows, width):
        out[:, blk] = x[..., blk, :].float().abs().sum(dim=dims)
    return out


def pivot_cosines(features: torch.Tensor, pivot_features: torch.Tensor) -> torch.Tensor:
    """``[B, P, N]`` float32 cosine similarity of each pivot to each row of ``features`` ``[B, N, D]``.

    Only the ``P`` pivot rows are normalised; the ``[B, N, P]`` product is divided by the token norms
    (``F.normalize``'s ``1e-12`` floor included), so no normalised copy of the ``N`` tokens is made. Norms
    are taken of rows scaled by a power of two (the product is scaled alike), so tokens of size ``1e30``
    or ``1e-30`` have the cosines of any other size.
    """
    unit = unit_vectors(pivot_features)  # [B, P, D] float32
    norms, scale = scaled_norms(features)  # [B, N]
    dots = rows_matmul(features, unit.transpose(1, 2))  # [B, N, P]
    dots.mul_(scale.unsqueeze(-1)).div_(norms.clamp_min(1e-12).unsqueeze(-1))
    return dots.transpose(1, 2).contiguous()


def remove_duplicates(cos: torch.Tensor, image_pivots: torch.Tensor, quotas: list[int]) -> torch.Tensor:
    """Steps 3 and 4: the kept positions, given the pivots.

    Parameters
    ----------
    cos : torch.Tensor
        ``[B, P, N]`` cosine similarity of each pivot, in the order the pivots claim, to each of the
        ``N`` image tokens (:func:`pivot_cosines`).
    image_pivots : torch.Tensor
        ``[B, P_img]`` positions of the image pivots among the ``N`` tokens (kept, never claimed).
    quotas : list of int
        Tokens each of the ``P`` pivots claims.

    Returns
    -------
    torch.Tensor
        ``[B, P_img + sum(quotas)]`` kept positions, ascending.
    """
    b, _, n = cos.shape
    free = torch.ones(b, n, dtype=torch.bool, device=cos.device)
    free.scatter_(1, image_pivots, False)
    kept = [image_pivots]
    for p, quota in enumerate(quotas):
        if quota == 0:
            continue
        dissimilarity = (-cos[:, p]).masked_fill(~free, float("-inf"))
        claimed = rank_descending(dissimilarity)[:, :quota]  # ties: the lower position
        free.scatter_(1, claimed, False)
        kept.append(claimed)
    return torch.cat(kept, dim=1).sort(dim=1).values


def _top_l1(values: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` largest L1 norms of ``values`` ``[B, N, D]``, largest first."""
    return rank_descending(_l1_norms(values))[:, :count]  # ties: the lower position


@register("dart")
class DART(Compressor):
    """DART before the language model: feature-norm pivots and removal of their duplicates.

    Parameters
    ----------
    pivot_image_tokens : int, default 4
        Pivots: the tokens of largest L1 norm. The budget must be at least this.

    Notes
    -----
    ``info["pivots"]`` ``[B, P]`` holds the pivot positions in claiming order.
    """

    stage = "pre_llm"
    needs_attention = False
    text_conditioned = False
    deterministic = True
    summary = "Pivots by L1 norm; each keeps the tokens least similar to it (duplicates dropped)."
    complexity = "O(P N D + N log N)"
    scale_invariant = True
    info_layout = {"pivots": "position"}
    paper = "Wen et al., DART, EMNLP 2025 (arXiv 2502.11494)"

    parameter_constraints = {"pivot_image_tokens": (Interval(int, 1),)}

    def __init__(self, *, pivot_image_tokens: int = 4) -> None:
        self.pivot_image_tokens = pivot_image_tokens

    def _check_budget(self, k: int, n: int, context: Context) -> None:
        if k < self.pivot_image_tokens:
            raise InvalidParameterError(
                f"{self.display_name()}: the budget K={k} is below pivot_image_tokens="
                f"{self.pivot_image_tokens}, which are always kept; raise the budget to at least "
                f"{self.pivot_image_tokens} or lower pivot_image_tokens."
            )

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        pivots = _top_l1(tokens, self.pivot_image_tokens)
        quotas = claim_quotas(k - self.pivot_image_tokens, self.pivot_image_tokens)
        kept = remove_duplicates(pivot_cosines(tokens, batched_gather(tokens, pivots)), pivots, quotas)
        return selection_result(tokens, kept, pivots=pivots)


@register("dart-llm")
class DARTLLM(DART):
    """DART at LLM layer ``layer``: key-norm pivots among image and text tokens, duplicates dropped.

    The model integration supplies, for the hidden states entering decoder layer ``layer``:
    ``Context.keys`` ``[B, H, L, Dh]`` (the previous layer's keys), ``Context.hidden_states``
    ``[B, L, D]`` (the previous layer's output after the model's final norm, as the authors use),
    ``Context.visual_positions`` ``[B, N]`` and, for padded prompts, ``Context.key_mask``. The text
    pivots are chosen among the valid positions after the last image token. ``tokens`` are the image
    tokens' hidden states; the kept ones are returned unchanged.

    Parameters
    ----------
    layer : int, default 2
        Decoder layers run before pruning (the authors' ``K``).
    pivot_image_tokens : int, default 4
        Image pivots, always kept.
    pivot_text_tokens : int, default 4
        Text pivots among the tokens after the image; they claim image tokens but are not image tokens.
    """

    stage = "in_llm"
    text_conditioned = True
    requires = ("keys", "hidden_states", "visual_positions")
    summary = "DART at LLM layer 2: image and text pivots by key L1 norm; their duplicates dropped."
    complexity = "O(L H Dh + P L D + N log N)"
    info_layout = {"pivots": "position", "text_pivots": "row"}

    parameter_constraints = {
        **DART.parameter_constraints,
        "layer": (Interval(int, 1),),
        "pivot_text_tokens": (Interval(int, 0),),
    }

    def __init__(self, *, layer: int = 2, pivot_image_tokens: int = 4, pivot_text_tokens: int = 4) -> None:
        super().__init__(pivot_image_tokens=pivot_image_tokens)
        self.layer = layer
        self.pivot_text_tokens = pivot_text_tokens

    def llm_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    @staticmethod
    def _after_image(length: int, positions: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``[B, L]`` bool: the text tokens, i.e. the valid positions after the last image token."""
        after = torch.arange(length, device=positions.device) > positions.max(dim=1, keepdim=True).values
        if key_mask is not None:
            after &= key_mask
        return after

    def _check_attention_inputs(self, updates: dict, context: Context, b: int, n: int) -> None:
        # Validation of the prompt, on the host before the kernel runs (it has to raise), so that
        # ``_compress`` itself never synchronises.
        super()._check_attention_inputs(updates, context, b, n)
        get = lambda name: updates.get(name, getattr(context, name))  # noqa: E731
        keys, positions = get("keys"), get("visual_positions")
        if keys is None or positions is None:
            return
        available = self._after_image(keys.shape[2], positions, get("key_mask")).sum(dim=1)
        if bool((available < self.pivot_text_tokens).any()):
            raise InputError(
                f"{self.display_name()}: pivot_text_tokens={self.pivot_text_tokens} but a prompt has only "
                f"{int(available.min())} valid token(s) after its image; lower pivot_text_tokens."
            )

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        owner = self.display_name()
        keys, states, positions = context.keys, context.hidden_states, context.visual_positions
        b, _, length, _ = keys.shape
        if states.shape[1] != length:
            raise InputError(
                f"{owner}: context.hidden_states [B, L, D] must cover the same L={length} positions as "
                f"context.keys; got shape {tuple(states.shape)}."
            )
        norms = _l1_norms(keys, dims=(1, 3))  # [B, L]: L1 norm of the heads-concatenated key
        image_pivots = rank_descending(norms.gather(1, positions))[:, : self.pivot_image_tokens]  # among N
        # Text tokens: valid positions after the last image token (enough of them: checked on input).
        after = self._after_image(length, positions, context.key_mask)
        text_pivots = rank_descending(norms.masked_fill(~after, float("-inf")))[:, : self.pivot_text_tokens]
        # The pivots' normed states; the image tokens' similarities are read off the whole prompt's
        # [B, P, L] cosines, so their [B, N, D] states are never gathered.
        pivot_features = torch.cat(
            [batched_gather(states, torch.gather(positions, 1, image_pivots)), batched_gather(states, text_pivots)],
            dim=1,
        )
        cos = pivot_cosines(states, pivot_features)  # [B, P, L]
        cos = torch.gather(cos, 2, positions.unsqueeze(1).expand(-1, cos.shape[1], -1))  # [B, P, N]
        quotas = claim_quotas(k - self.pivot_image_tokens, self.pivot_image_tokens + self.pivot_text_tokens)
        kept = remove_duplicates(cos, image_pivots, quotas)
        return selection_result(tokens, kept, pivots=image_pivots, text_pivots=text_pivots)
