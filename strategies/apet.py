"""ApET: approximation-error guided token compression.

Paper: *ApET: Approximation-Error Guided Token Compression for Efficient VLMs*, arXiv 2602.19870.
Authors' code: ``MaQianKun0/ApET`` (``llava/model/llava_arch.py``, ``llava/model/utils.py``,
``qwen/model/qwen2_5_vl_custom.py``).

The algorithm, as the authors run it before the language model (their defaults are ours):

1. **Basis**: choose ``M = num_basis`` tokens, by farthest-point sampling with squared L2 distance
   from a random start (``fps``), by greedy QR column pivoting (``qr``) or uniformly with
   replacement (``random``).
2. **Linear approximation**: ``G = S S^T + ridge * I``, ``C = solve(G, S X^T)^T``, ``X_hat = C S``.
3. **Error** of each token: the L2 norm of its residual row (other norms by ``error_norm``).
4. **Keep** the ``K`` tokens with the largest error: the basis explains them worst.
5. **Basis injection**: the ``M`` kept tokens with the lowest errors (the last ``M`` of the top-K
   list) are overwritten by the basis tokens: ``replace`` (LLaVA) stores ``S_j``, ``mix``
   (Qwen2.5-VL) stores ``0.5 S_j + 0.5 X_slot``. In stage 1 the authors assign by boolean mask, so
   basis token ``j`` lands on the ``j``-th smallest position among those slots; their LLaVA stage 2
   assigns by index, basis ``j`` to the ``j``-th of those slots in top-K order (``injection_order``).
6. **Merge**: every dropped token joins the kept non-basis token of highest cosine similarity, which
   becomes the unweighted mean ``(x + sum) / (1 + count)``.
7. **Output** in ascending original position.

Departures from the authors' code, all numerical: the maths run in float32 throughout (float64 for
float64 tokens; the authors cast to half precision between steps 4 and 6 in LLaVA stage 1), half
precision tokens are read in float32 row blocks rather than copied whole, and the small ``M x M``
solve runs in float64 (so repeated basis tokens never make it singular); FPS starts from distance
``+inf`` (theirs: ``1e10``, which differs only when squared distances exceed ``1e10``); ties in the
error ranking go to the lower position. Distances, norms and products are formed on the tokens scaled
by a power of two per image (exact: the same values on tokens of ordinary size, and no float32
overflow for tokens of size ``1e30``), and where the ridge is too small to change the float64 Gram
matrix (below ``M eps`` times its largest entry: basis tokens of norm above ~``7e4`` with the defaults)
the smallest ridge it resolves is used, so repeated basis tokens never make the solve singular. The
output has the input's dtype.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from tokencomp.base import Compressor
from tokencomp.constraints import Boolean, Interval, Options
from tokencomp.errors import InputError, InvalidParameterError
from tokencomp.kernels import (
    PivotedQR,
    batched_gather,
    compute_dtype,
    fps_indices,
    merge_rows,
    norm_scale,
    pivoted_ridge_errors,
    put_rows,
    qr_pivots,
    random_indices,
    ridge_errors,
    slots_of,
)
from tokencomp.kernels.lstsq import ERROR_NORMS
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context
from tokencomp.validation import SEED

BASES = ("fps", "random", "qr")
INJECTIONS = ("replace", "mix", "none")
INJECTION_ORDERS = ("position", "rank")


@register("apet")
class ApET(Compressor):
    """Approximation-error guided token compression (ApET, arXiv 2602.19870).

    Rebuild the tokens from a few basis tokens by ridge least squares and keep the tokens the basis
    explains worst; inject the basis tokens into the least informative kept slots and merge every
    dropped token into its most similar kept token. With default parameters this is the authors'
    LLaVA-1.5 stage-1 procedure.

    Parameters
    ----------
    basis : {"fps", "random", "qr"}, default "fps"
        How the ``num_basis`` basis tokens are chosen: farthest-point sampling with squared L2
        distance (the authors' default), uniform sampling with replacement, or the first pivots of
        QR with column pivoting (the same pivots as LAPACK ``geqp3`` on ``X^T``).
    num_basis : int, default 10
        Number ``M`` of basis tokens.
    fps_start : "random" or int, default "random"
        Start of farthest-point sampling: a seeded uniformly random index per image (the authors'
        choice), or a fixed token index.
    error_norm : {"l2", "l1", "linf", "relative"}, default "l2"
        Norm of the residual row used as the token's error; ``relative`` is ``l2`` over the token's
        own L2 norm.
    ridge : float, default 1e-5
        Ridge (> 0) added to the basis Gram matrix; the authors' running code uses 1e-5 for LLaVA
        and Qwen2.5-VL alike (1e-1 appears only in an unused Qwen path).
    basis_injection : {"replace", "mix", "none"}, default "replace"
        Overwrite the ``M`` lowest-error kept slots with the basis tokens (LLaVA), store
        ``0.5 * basis + 0.5 * slot`` there (Qwen2.5-VL), or keep the selected tokens as they are.
    injection_order : {"position", "rank"}, default "position"
        Which of those slots basis token ``j`` goes to: the ``j``-th smallest position (the
        authors' stage 1, LLaVA and Qwen) or the ``j``-th in top-K order (their LLaVA stage 2).
    merge : bool, default True
        Average every dropped token into its most cosine-similar kept non-basis token.
    seed : int or None, default 0
        Seed of the random start / random basis; ``None`` draws from torch's global generator.

    Notes
    -----
    With injection, the budget must hold the basis (``K >= num_basis``), and with ``merge`` at least
    one non-basis slot must receive the dropped tokens (``K > num_basis`` unless ``K = N``).

    ``info`` holds ``basis_indices`` ``[B, M]`` (selection order), ``errors`` ``[B, N]`` and
    ``basis_slots`` ``[B, M]`` (the output slots holding basis token ``j``; ``-1`` without injection).
    In ``assignment``, an injected slot keeps mapping from its own position (its original content is
    replaced under ``replace``), and dropped basis tokens are merged like every other dropped token,
    exactly as the authors' code does with their values.

    Not scale-invariant (``scale_invariant = False``): the ridge is an absolute constant, so for tokens
    of size ``1e-30`` it outweighs the basis Gram matrix, every coefficient is about 0 and the errors
    are the tokens' own norms; for tokens of ordinary or larger size it is negligible.
    """

    stage = "pre_llm"
    needs_attention = False
    text_conditioned = False
    deterministic = False
    scale_invariant = False  # the ridge is absolute (see Notes)
    summary = "Keep the tokens a least-squares basis rebuilds worst; inject the basis, merge the rest."
    complexity = "O(M N D + (N - K) K D)"
    info_layout = {"basis_indices": "position", "errors": "token", "basis_slots": "row"}
    paper = "Ma et al., ApET: Approximation-Error Guided Token Compression, arXiv 2602.19870 (2026)"
    parameter_constraints = {
        "basis": (Options(BASES),),
        "num_basis": (Interval(int, 1),),
        "fps_start": (Options(("random",)), Interval(int, 0)),
        "error_norm": (Options(ERROR_NORMS),),
        "ridge": (Interval(float, 0.0, closed="right"),),
        "basis_injection": (Options(INJECTIONS),),
        "injection_order": (Options(INJECTION_ORDERS),),
        "merge": (Boolean(),),
        "seed": SEED,
    }

    def __init__(
        self,
        *,
        basis: str = "fps",
        num_basis: int = 10,
        fps_start: Union[str, int] = "random",
        error_norm: str = "l2",
        ridge: float = 1e-5,
        basis_injection: str = "replace",
        injection_order: str = "position",
        merge: bool = True,
        seed: Optional[int] = 0,
    ) -> None:
        self.basis = basis
        self.num_basis = num_basis
        self.fps_start = fps_start
        self.error_norm = error_norm
        self.ridge = ridge
        self.basis_injection = basis_injection
        self.injection_order = injection_order
        self.merge = merge
        self.seed = seed

    @property
    def _injects(self) -> bool:
        return self.basis_injection != "none"

    def _check_budget(self, k: int, n: int, context: Context) -> None:
        m = self.num_basis
        if isinstance(self.fps_start, int) and self.basis == "fps" and self.fps_start >= n:
            raise InvalidParameterError(
                f"{self.display_name()}: fps_start={self.fps_start} is not a token index for N={n} tokens; "
                f"use an index in [0, {n - 1}] or fps_start='random'."
            )
        if not self._injects:
            return
        low = m + 1 if (self.merge and k < n) else m
        if k < low:
            raise InputError(
                f"{self.display_name()}: budget K={k} cannot hold num_basis={m} injected basis tokens"
                + (" plus one slot to merge the dropped tokens into" if low > m else "")
                + f"; with basis_injection={self.basis_injection!r} K must be >= {low} (N={n}). "
                "Raise the budget, lower num_basis, or set basis_injection='none'."
            )

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        x = tokens  # never copied whole: the kernels read it in row blocks, in float32 (float64)
        b, n, _ = x.shape
        m = self.num_basis

        # 1. Basis selection. The QR basis comes with the tokens it read (scaled by a power of two, or the
        # tokens themselves): the steps below read them (still in cache) and scale the output back, which
        # is exact (the same values, bit for bit, on tokens of ordinary size).
        qr = self._pivots(x, m) if self.basis == "qr" else None
        basis_idx = qr.pivots if qr is not None else self._select_basis(x, context)
        source = qr.tokens[:, :n] if qr is not None else x
        s = batched_gather(source, basis_idx).to(compute_dtype(x.dtype))  # [B, M, D]

        # 2.-3. Ridge least-squares approximation and each token's error (for the QR basis and a norm
        # of the residual's length, read off the factorisation the pivots came with).
        if qr is not None and self.error_norm in ("l2", "relative"):
            errors = pivoted_ridge_errors(qr, self.ridge, self.error_norm)
        else:
            errors = ridge_errors(x, s if qr is None else s / qr.tokens_scale, self.ridge, self.error_norm)

        # 4. Keep the K tokens with the largest error (ties: lower position first).
        order = torch.sort(errors, dim=-1, descending=True, stable=True).indices
        kept, dropped = order[:, :k], order[:, k:]
        values = batched_gather(source, kept).to(s.dtype)  # in top-K order

        # 5. Basis injection into the M kept slots of lowest error.
        n_inject = m if self._injects else 0
        inject_rank = torch.empty(b, 0, dtype=torch.int64, device=x.device)
        if self._injects:
            if self.injection_order == "position":  # boolean-mask assignment in the authors' stage 1
                inject_rank = (k - m) + kept[:, k - m :].argsort(dim=-1)
            else:  # index assignment in top-K order (their LLaVA stage 2)
                inject_rank = torch.arange(k - m, k, device=x.device).expand(b, m)
            if self.basis_injection == "replace":
                put_rows(values, inject_rank, s)
            else:  # "mix"
                put_rows(values, inject_rank, 0.5 * s + 0.5 * batched_gather(values, inject_rank))

        # 6. Merge every dropped token into its most similar kept non-basis token (the QR basis knows
        # the norms of the scaled tokens).
        targets = k - n_inject
        match = None
        if self.merge and dropped.shape[1] > 0:
            norms = None
            if qr is not None:  # of the source rows: |x f| t / f
                norms = qr.norms.gather(1, kept[:, :targets]).sqrt_()
                norms.mul_((qr.tokens_scale / qr.scale).view(b, 1))
            values[:, :targets], match = merge_rows(values[:, :targets], source, dropped, norms)

        # 7. Output in ascending original position.
        indices, perm = kept.sort(dim=-1)
        out = batched_gather(values, perm)
        if qr is not None:
            out.div_(qr.tokens_scale)
        assignment = slots_of(indices, n)
        slot_of_rank = perm.argsort(dim=-1)  # top-K rank -> output slot
        if match is not None:
            assignment.scatter_(1, dropped, torch.gather(slot_of_rank, 1, match))
        basis_slots = (
            torch.gather(slot_of_rank, 1, inject_rank)
            if self._injects
            else torch.full((b, m), -1, dtype=torch.int64, device=x.device)
        )
        return CompressionResult(
            tokens=out,
            indices=indices,
            assignment=assignment,
            info={"basis_indices": basis_idx, "errors": errors, "basis_slots": basis_slots},
        )

    def _inspect(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if self.basis != "qr":
            return super()._inspect(tokens)
        norms, scale, ok = norm_scale(tokens)  # the QR basis reads every token's norm anyway
        return ok, (norms, scale)

    def _pivots(self, x: torch.Tensor, m: int) -> PivotedQR:
        """:func:`~tokencomp.kernels.qr_pivots`, scaled from the tokens' norms where :meth:`_inspect` computed
        them (one pass over the tokens fewer)."""
        inspected = self._inspected(x)
        if inspected is None:
            return qr_pivots(x, m)
        norms, scale = inspected
        return qr_pivots(x, m, scale, (norms * scale.view(-1, 1)).square_())

    def _select_basis(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        """Basis indices ``[B, M]`` of the ``fps`` and ``random`` bases (``qr`` comes with its factorisation)."""
        b, n, _ = x.shape
        if self.basis == "random":
            generator = self._generator(context, x.device)
            return random_indices(b, n, self.num_basis, generator=generator, device=x.device)
        if self.fps_start == "random":
            start = torch.randint(n, (b,), generator=self._generator(context, x.device), device=x.device)
        else:
            start = torch.full((b,), self.fps_start, dtype=torch.int64, device=x.device)
        return fps_indices(x, self.num_basis, start)


@register("apet-llm")
class ApETLLM(ApET):
    """ApET's second stage: the same procedure on the language model's hidden states at a layer.

    The authors run it at prefill on LLaVA-1.5 / LLaVA-NeXT after decoder layer 16 of 32, on the
    hidden states of the visual tokens that survived stage 1; later layers and decoding see the
    shorter sequence (the model integration does that plumbing; this class is the tensor maths).
    Their stage 2 differs from stage 1 in one detail: the basis tokens are assigned by index, basis
    ``j`` to the ``j``-th of the lowest-error kept slots in top-K order, so ``injection_order``
    defaults to ``"rank"``; and it merges in float32.

    Parameters
    ----------
    layer : int, default 16
        Number of decoder layers run before compressing (the hidden states entering layer
        ``layer``, 0-based, i.e. the output of the 16th layer).
    basis, num_basis, fps_start, error_norm, ridge, basis_injection, injection_order, merge, seed
        As for :class:`ApET`, with ``injection_order="rank"``.
    """

    stage = "in_llm"
    in_llm_positions = "renumber"  # the authors renumber the position ids after their stage-2 cut
    summary = "ApET's stage 2 on LLM hidden states at a decoder layer (authors: after layer 16)."
    complexity = "O(M N D + (N - K) K D)"
    parameter_constraints = {**ApET.parameter_constraints, "layer": (Interval(int, 0),)}

    def __init__(
        self,
        *,
        layer: int = 16,
        basis: str = "fps",
        num_basis: int = 10,
        fps_start: Union[str, int] = "random",
        error_norm: str = "l2",
        ridge: float = 1e-5,
        basis_injection: str = "replace",
        injection_order: str = "rank",
        merge: bool = True,
        seed: Optional[int] = 0,
    ) -> None:
        super().__init__(
            basis=basis,
            num_basis=num_basis,
            fps_start=fps_start,
            error_norm=error_norm,
            ridge=ridge,
            basis_injection=basis_injection,
            injection_order=injection_order,
            merge=merge,
            seed=seed,
        )
        self.layer = layer

    def llm_layers(self) -> tuple[int, ...]:
        return (self.layer,)
