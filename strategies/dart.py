"""DART: keep a few pivot tokens and, for each, the tokens that duplicate it least.

Paper: Wen et al., *Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More* (DART), EMNLP 2025 (arXiv 2502.11494). Authors' code: ``ZichenWen1/DART``,
``llava/model/language_model/modeling_llama_self.py`` (``DART.forward``, which prunes at layer ``K`` of
the LLaMA decoder, and ``DART.get_retained_image_token``, l. 397-450 at commit ``9fee9fa``). Their
LLaVA-1.5 scripts (``scripts/v1_5/eval/*.sh``, ``llava/eval/model_vqa_loader.py``) use ``K = 2``,
``pivot_image_token = 4``, ``pivot_text_token = 4`` and ``max_num_trunction`` = 128 (or 64, 32).

The algorithm at LLM layer ``K`` (:class:`DARTLLM`, ``dart-llm``), at prefill:

1. **Pivots.** The keys that layer ``K - 1`` produced, heads concatenated, give every token an L1 norm.
   The ``pivot_image_tokens`` image tokens and the ``pivot_text_tokens`` tokens after the image (the
   instruction) of largest key norm are the pivots.
2. **Quota.** Each of the ``P = pivot_image_tokens + pivot_text_tokens`` pivots claims
   ``max_num_trunction // P`` image tokens.
3. **Visiting order.** The authors put the pivots' sequence positions in a Python ``set`` (image pivots
   first, each group by descending norm) and visit them in the order ``list()`` of that set gives. That
   order is not random: ``hash(i) == i`` for an int, so it is CPython's hash-table layout, a fixed
   function of the positions (slot ``i & mask``, then linear and perturbed probing; the table grows
   from 8 to 32 slots at the fifth insertion). :func:`python_set_order` computes it, batched.
4. **Duplicate removal.** Pivot by pivot in that order, among the image tokens neither pivots nor
   already claimed, the pivot claims the ones **least** cosine-similar to it (``topk`` of ``-cos``),
   measured on the hidden states leaving layer ``K - 1`` after the model's final norm.
5. **Keep** the image pivots and every claimed token, in their original order; drop the rest (no
   merging). The text pivots only steer; they are not image tokens and stay in the sequence anyway.

**Budget.** The authors' setting ``max_num_trunction = M`` keeps ``P_img + P * (M // P)`` image tokens:
their "128" keeps ``4 + 8 * 16 = 132`` of LLaVA-1.5's 576, "64" keeps ``4 + 8 * 8 = 68``, "32" keeps
``36``. (Without ``max_num_trunction`` they use ``(N * (1 - reduction_ratio)) // P`` per pivot; their
LLaVA-1.5 scripts always pass it, so their ``reduction_ratio`` is unused there.) Our budget ``K`` is the
number kept; :meth:`DARTLLM.authors_budget` turns their setting into it, so
``comp.compress(x, comp.authors_budget(128), ctx)`` keeps exactly what their code keeps.

**Before the language model** (:class:`DART`, ``dart``) is **our own variant**: the authors have none,
they run DART only inside the LLM. The same rule runs on the vision features with image pivots only:
the ``pivot_image_tokens`` features of largest L1 norm, cosine similarity between the features
themselves, and the set order of the pivots' feature indices ``0 .. N - 1``.

Departures, all stated:

- **Exact budget.** The authors keep ``P_img + P * (max_num_trunction // P)`` tokens, which is rarely
  the requested count. We keep exactly ``k``: the ``k - P_img`` claims are split as evenly as possible,
  the first ``(k - P_img) mod P`` pivots *in visiting order* claiming one more. With
  ``k = P_img + P * t`` (what :meth:`DARTLLM.authors_budget` returns) this is their rule exactly.
- **Pivot order.** ``pivot_order="authors"`` (default) reproduces their set order from the pivots'
  positions as the set saw them: sequence positions, with left padding (``Context.key_mask``) removed,
  as in their batch-of-one prompts. It matches theirs when the image sits where their prompt puts it
  (position 35 in LLaVA-1.5's ``vicuna_v1`` template); a different template moves the positions and so
  the order. The order is that of CPython 3.7 and later (3.10 in the authors' environment); it is
  checked against the running interpreter's ``set``. ``pivot_order="norm"`` visits the image pivots
  by descending key norm, then the text pivots by descending key norm (the set's insertion order).
- Ties (equal norms, equal similarities) go to the lower position: stable sorts instead of the authors'
  ``topk``, which leaves their order unspecified.
- Maths in float32; batched over ``B`` (the authors handle batch row 0 only and assert ``B == 1``).
- Not covered: the authors' LLaVA-NeXT path (``config.text_length``, ``retain_token_num_for_llava_next``).
"""

from __future__ import annotations

from typing import Optional

import torch

from tokencomp.base import Compressor
from tokencomp.constraints import Interval, Options
from tokencomp.errors import InputError, InvalidParameterError
from tokencomp.kernels import batched_gather, row_blocks, rows_matmul, selection_result
from tokencomp.kernels.attention import rank_descending
from tokencomp.kernels.blocks import scaled_norms, unit_vectors
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context

# CPython's set table (Objects/setobject.c): at least 8 slots, linear probes of 9 after the home slot,
# then a perturbed jump; the table is rebuilt (in slot order) once it is 3/5 full.
_SET_MIN_SIZE = 8
_LINEAR_PROBES = 9
_PERTURB_SHIFT = 5


def _set_resize_target(used: int) -> int:
    """The table size CPython's set moves to when ``used`` keys trigger a resize."""
    minused = used * 2 if used > 50000 else used * 4
    size = _SET_MIN_SIZE
    while size <= minused:
        size <<= 1
    return size


def _probe_slots(hashes: torch.Tensor, size: int, bound: int) -> torch.Tensor:
    """``[B, P, S]`` the slots a set of ``size`` slots tries for each key, in order (``-1``: not tried).

    Each outer step ``t`` tries its start slot ``i_t`` and, when ``i_t + 9`` fits in the table, the 9 after
    it; then ``perturb >>= 5`` and ``i_{t+1} = (5 i_t + 1 + perturb) & mask``, with ``i_0 = hash & mask``.
    Since 5 is invertible modulo the (power of two) size, ``i_t = 5^t (i_0 + sum_{s <= t} 5^-s (1 +
    (hash >> 5 s)))``, computed for every step at once. Keys are below ``bound``, so ``perturb`` is zero
    after a known number of steps; ``size`` more steps visit every slot (``5 i + 1`` is a full cycle
    modulo a power of two), so an empty slot is always among the ``S`` tried.
    """
    mask = size - 1
    steps, rest = size, max(0, bound - 1)
    while rest:
        rest >>= _PERTURB_SHIFT
        steps += 1
    device = hashes.device
    step = torch.arange(1, steps, device=device)
    pow5 = torch.tensor([pow(5, t, size) for t in range(steps)], device=device)
    inverse = pow(5, -1, size)
    inv_pow5 = torch.tensor([pow(inverse, t, size) for t in range(1, steps)], device=device)
    perturb = (hashes.unsqueeze(-1) >> (_PERTURB_SHIFT * step).clamp_max(63)) & mask  # [B, P, steps - 1]
    scaled = torch.cumsum(((1 + perturb) * inv_pow5) & mask, dim=-1)
    scaled = torch.cat([torch.zeros_like(scaled[..., :1]), scaled], dim=-1)  # step 0 adds nothing
    start = (pow5 * (((hashes & mask).unsqueeze(-1) + scaled) & mask)) & mask  # [B, P, steps]
    offsets = torch.arange(_LINEAR_PROBES + 1, device=device)
    linear = (start + _LINEAR_PROBES <= mask).unsqueeze(-1) | (offsets == 0)
    tried = torch.where(linear, start.unsqueeze(-1) + offsets, -1)  # [B, P, steps, 10]
    return tried.flatten(-2)


def _set_insert(table: torch.Tensor, tried: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Put ``columns`` ``[B]`` (``-1``: none) in the first empty slot each tries (``tried`` ``[B, S]``)."""
    empty = (tried >= 0) & (table.gather(1, tried.clamp_min(0)) < 0)
    slot = tried.gather(1, empty.int().argmax(dim=1, keepdim=True))  # the first empty slot tried
    return torch.where((columns >= 0).unsqueeze(1), table.scatter(1, slot, columns.unsqueeze(1)), table)


def python_set_order(keys: torch.Tensor, bound: int) -> torch.Tensor:
    """The order in which CPython lists ``set(keys[b].tolist())``, batched and on ``keys``' device.

    Parameters
    ----------
    keys : torch.Tensor
        ``[B, P]`` int64, distinct non-negative integers per row (``hash(i) == i``), in insertion order.
    bound : int
        An upper bound (exclusive) on the keys, e.g. the sequence length.

    Returns
    -------
    torch.Tensor
        ``[B, P]`` int64 columns of ``keys``: row ``b`` lists ``keys[b, order[b]]`` as
        ``list(set(keys[b].tolist()))`` does.

    Notes
    -----
    The table's size after each insertion depends only on the count, so the loop runs over the ``P``
    insertions and the resizes' slots (host-known counts), each step vectorised over the batch.
    """
    b, p = keys.shape
    keys = keys.long()
    size = _SET_MIN_SIZE
    table = torch.full((b, size), -1, dtype=torch.long, device=keys.device)  # the column in each slot
    tried = _probe_slots(keys, size, bound)  # [B, P, S]
    rows = torch.arange(b, device=keys.device)
    for column in range(p):
        table = _set_insert(table, tried[:, column], torch.full((b,), column, device=keys.device))
        used = column + 1
        if used * 5 >= (size - 1) * 3:
            size, old = _set_resize_target(used), table
            table = torch.full((b, size), -1, dtype=torch.long, device=keys.device)
            tried = _probe_slots(keys, size, bound)
            for slot in range(old.shape[1]):  # rebuilt in the old table's slot order
                moving = old[:, slot]
                table = _set_insert(table, tried[rows, moving.clamp_min(0)], moving)
    listed = torch.sort((table < 0).to(torch.uint8), dim=1, stable=True).indices[:, :p]
    return table.gather(1, listed)


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


def visiting_order(pivot_order: str, hashed_positions: torch.Tensor, bound: int) -> torch.Tensor:
    """``[B, P]`` the order (columns of ``hashed_positions``) in which the pivots claim their tokens.

    ``"authors"``: the order ``list(set(positions))`` gives (:func:`python_set_order`); ``"norm"``: the
    insertion order itself (image pivots, then text pivots, each by descending norm).
    """
    if pivot_order == "norm":
        return torch.arange(hashed_positions.shape[1], device=hashed_positions.device).expand_as(hashed_positions)
    return python_set_order(hashed_positions, bound)


def in_order(cos: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The ``[B, P, N]`` pivot rows of ``cos`` rearranged into visiting ``order`` ``[B, P]``."""
    return cos.gather(1, order.unsqueeze(-1).expand(-1, -1, cos.shape[2]))


_PIVOT_ORDERS = Options(
    ("authors", "norm"),
    hint="'authors' visits the pivots in the order of the authors' Python set, 'norm' by descending norm.",
)


@register("dart")
class DART(Compressor):
    """DART before the language model (our own variant): feature-norm pivots, their duplicates dropped.

    The authors run DART only inside the LLM (``dart-llm``); this applies its rule to the vision features.

    Parameters
    ----------
    pivot_image_tokens : int, default 4
        Pivots: the tokens of largest L1 norm. The budget must be at least this.
    pivot_order : {"authors", "norm"}, default "authors"
        The order in which the pivots claim tokens: that of a Python ``set`` of their indices, as the
        authors' code visits its pivots, or by descending norm.

    Notes
    -----
    ``info["pivots"]`` ``[B, P]`` holds the pivot positions by descending norm; ``info["pivot_order"]``
    ``[B, P]`` the order in which they claimed (indices into ``info["pivots"]``).
    """

    stage = "pre_llm"
    needs_attention = False
    text_conditioned = False
    deterministic = True
    summary = (
        "Our pre-LLM variant of DART (the authors prune inside the LLM only): pivots by L1 norm keep the "
        "tokens least similar to them."
    )
    complexity = "O(P N D + N log N)"
    scale_invariant = True
    info_layout = {"pivots": "position", "pivot_order": "row"}
    paper = "Wen et al., DART, EMNLP 2025 (arXiv 2502.11494); pre-LLM variant: tokencomp's own"

    parameter_constraints = {"pivot_image_tokens": (Interval(int, 1),), "pivot_order": (_PIVOT_ORDERS,)}

    def __init__(self, *, pivot_image_tokens: int = 4, pivot_order: str = "authors") -> None:
        self.pivot_image_tokens = pivot_image_tokens
        self.pivot_order = pivot_order

    def _check_budget(self, k: int, n: int, context: Context) -> None:
        if k < self.pivot_image_tokens:
            raise InvalidParameterError(
                f"{self.display_name()}: the budget K={k} is below pivot_image_tokens="
                f"{self.pivot_image_tokens}, which are always kept; raise the budget to at least "
                f"{self.pivot_image_tokens} or lower pivot_image_tokens."
            )

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        pivots = _top_l1(tokens, self.pivot_image_tokens)
        order = visiting_order(self.pivot_order, pivots, tokens.shape[1])
        cos = in_order(pivot_cosines(tokens, batched_gather(tokens, pivots)), order)
        quotas = claim_quotas(k - self.pivot_image_tokens, self.pivot_image_tokens)
        kept = remove_duplicates(cos, pivots, quotas)
        return selection_result(tokens, kept, pivots=pivots, pivot_order=order)


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
    pivot_order : {"authors", "norm"}, default "authors"
        The order in which the pivots claim tokens: that of the authors' Python ``set`` of the pivots'
        sequence positions (left padding removed), or image pivots then text pivots by descending norm.

    Notes
    -----
    The authors' setting ``max_num_trunction`` maps to our budget through :meth:`authors_budget`: their
    "128" is ``K = 132`` with the defaults. ``info["pivots"]`` (image pivots, by descending norm),
    ``info["text_pivots"]`` (their sequence positions) and ``info["pivot_order"]`` (the claiming order,
    as indices into the image pivots followed by the text pivots).
    """

    stage = "in_llm"
    text_conditioned = True
    requires = ("keys", "hidden_states", "visual_positions")
    summary = "DART at LLM layer 2: image and text pivots by key L1 norm; their duplicates dropped."
    complexity = "O(L H Dh + P L D + N log N)"
    info_layout = {"pivots": "position", "text_pivots": "row", "pivot_order": "row"}
    paper = "Wen et al., DART, EMNLP 2025 (arXiv 2502.11494)"

    parameter_constraints = {
        **DART.parameter_constraints,
        "layer": (Interval(int, 1),),
        "pivot_text_tokens": (Interval(int, 0),),
    }

    def __init__(
        self,
        *,
        layer: int = 2,
        pivot_image_tokens: int = 4,
        pivot_text_tokens: int = 4,
        pivot_order: str = "authors",
    ) -> None:
        super().__init__(pivot_image_tokens=pivot_image_tokens, pivot_order=pivot_order)
        self.layer = layer
        self.pivot_text_tokens = pivot_text_tokens

    def llm_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def authors_budget(
        self, max_num_trunction: Optional[int] = None, *, reduction_ratio: Optional[float] = None, n: int = 576
    ) -> int:
        """The budget ``K`` that keeps exactly the image tokens the authors' code keeps for their setting.

        Each of the ``P = pivot_image_tokens + pivot_text_tokens`` pivots claims
        ``max_num_trunction // P`` tokens and the image pivots are kept too, so
        ``K = pivot_image_tokens + P * (max_num_trunction // P)``: ``authors_budget(128) == 132`` with
        the defaults. Without ``max_num_trunction`` the authors' code claims
        ``(n * (1 - reduction_ratio)) // P`` per pivot instead (their LLaVA-1.5 scripts always pass
        ``max_num_trunction``, so there the ratio is unused).

        Parameters
        ----------
        max_num_trunction : int, optional
            The authors' ``--max_num_trunction`` (128, 64 or 32 in their scripts), at least 0.
        reduction_ratio : float, optional
            The authors' ``--reduction_ratio`` in ``[0, 1)``, used only when ``max_num_trunction`` is not
            given.
        n : int, default 576
            Image tokens in the prompt (LLaVA-1.5: 576).

        Returns
        -------
        int
            ``K`` for :meth:`compress`.

        Raises
        ------
        tokencomp.errors.InputError
            Neither or both settings given, a value out of range, or a ``K`` above ``n`` (the authors'
            ``topk`` would fail there).
        """
        owner = self.display_name()
        if (max_num_trunction is None) == (reduction_ratio is None):
            raise InputError(
                f"{owner}: authors_budget takes exactly one of max_num_trunction or reduction_ratio; got "
                f"max_num_trunction={max_num_trunction!r}, reduction_ratio={reduction_ratio!r}. Pass the "
                f"authors' --max_num_trunction (e.g. 128) or, without it, their --reduction_ratio."
            )
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(f"{owner}: authors_budget needs n, the number of image tokens, >= 1; got {n!r}.")
        pivots = self.pivot_image_tokens + self.pivot_text_tokens
        if max_num_trunction is not None:
            if not isinstance(max_num_trunction, int) or isinstance(max_num_trunction, bool) or max_num_trunction < 0:
                raise InputError(f"{owner}: max_num_trunction must be an integer >= 0; got {max_num_trunction!r}.")
            per_pivot = max_num_trunction // pivots
        else:
            ratio_ok = isinstance(reduction_ratio, (int, float)) and not isinstance(reduction_ratio, bool)
            if not ratio_ok or not 0 <= reduction_ratio < 1:
                raise InputError(f"{owner}: reduction_ratio must be a number in [0, 1); got {reduction_ratio!r}.")
            per_pivot = int((n * (1 - reduction_ratio)) // pivots)  # float floor division, as theirs
        k = self.pivot_image_tokens + pivots * per_pivot
        if k > n:
            raise InputError(
                f"{owner}: that setting keeps {self.pivot_image_tokens} + {pivots} * {per_pivot} = {k} image "
                f"tokens, more than the n={n} there are; lower it."
            )
        return k

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

    @staticmethod
    def _unpadded(rows: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Sequence positions ``rows`` ``[B, P]`` with the masked (padding) positions before them removed."""
        if key_mask is None:
            return rows
        return (torch.cumsum(key_mask.long(), dim=1) - 1).gather(1, rows)

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
        # The pivots' sequence positions, image pivots first: the authors' set is built in this order.
        pivot_rows = torch.cat([torch.gather(positions, 1, image_pivots), text_pivots], dim=1)
        order = visiting_order(self.pivot_order, self._unpadded(pivot_rows, context.key_mask), length)
        # The pivots' normed states; the image tokens' similarities are read off the whole prompt's
        # [B, P, L] cosines, so their [B, N, D] states are never gathered.
        cos = pivot_cosines(states, batched_gather(states, pivot_rows))  # [B, P, L]
        cos = torch.gather(cos, 2, positions.unsqueeze(1).expand(-1, cos.shape[1], -1))  # [B, P, N]
        quotas = claim_quotas(k - self.pivot_image_tokens, self.pivot_image_tokens + self.pivot_text_tokens)
        kept = remove_duplicates(in_order(cos, order), image_pivots, quotas)
        return selection_result(tokens, kept, pivots=image_pivots, text_pivots=text_pivots, pivot_order=order)
