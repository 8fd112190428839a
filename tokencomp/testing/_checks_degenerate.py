"""Checks on degenerate inputs: identical, zero, rank-deficient, single and extreme-magnitude tokens.

How much these checks can demand of the output tokens is read from the strategy's declarations
``convex_outputs`` and ``scale_invariant`` (see :class:`~tokencomp.Compressor`; a property when a
parameter decides), never from a list of names.
"""

from __future__ import annotations

import torch

from ..base import Compressor
from ._asserts import assert_result_valid, assert_within_bounds, span_fit
from ._calls import accepts, fresh, is_selection, pinned, some_budgets
from ._data import B, D, N, float16_tokens, identical_tokens, make_context, make_tokens, rank_two_tokens

# Scales of check_extreme_magnitudes: powers of two, so that the scaled tokens are exactly proportional
# to the originals (about 1e-30 and 1e30 in float32, 1e-3 and 2e3 in float16).
_FLOAT32_SCALES = (2.0**-100, 2.0**100)
_FLOAT16_SCALES = (2.0**-10, 2.0**11)


def check_identical_tokens(compressor: Compressor) -> None:
    """Identical tokens (every one of the ``N`` tokens the same vector ``v``) are compressed normally.

    At every budget the result is valid (indices unique, in range and ordered as declared, ``assignment``
    consistent with them, tokens and ``info`` finite), and two calls give the same result. Every output
    token is ``v``: exactly for a strategy that returns input tokens unchanged, to float rounding for
    one that merges (the mean of copies of ``v`` is ``v``). A strategy whose outputs are not averages
    (its ``convex_outputs`` is False: PruMerge's ``x_i + sum_j a_j x_j``, VisionZip's ``target + mean``)
    gives positive multiples ``c v`` instead. Which tokens are kept is the strategy's tie rule; nothing
    divides by the zero spread of the tokens' scores or distances (CDPruner's min-max relevance, for one,
    is 1 for every token then).
    """
    x, v = identical_tokens()
    ctx = make_context(compressor, x)
    for k in some_budgets(compressor):
        first = compressor.compress(x, k, pinned(compressor, ctx))
        selection = is_selection(compressor, k)  # then its outputs are exactly v, the tokens at indices
        assert_result_valid(
            compressor, first, x, k, selection=selection, finite_info=True, what=f"identical tokens, K={k}"
        )
        if selection:
            pass
        elif compressor.convex_outputs:

            def message(m: str, k: int = k) -> str:
                return f"{compressor!r}: identical tokens, K={k}: the outputs are not the common vector. {m}"

            torch.testing.assert_close(
                first.tokens, v.expand(B, k, D), rtol=1e-5, atol=1e-5 * float(v.abs().max()), msg=message
            )
        else:
            coef, residual = span_fit(first.tokens, v.expand(B, 1, D))
            assert bool((residual <= 1e-5).all()) and bool((coef > 0).all()), (
                f"{compressor!r}: identical tokens, K={k}: an output is not a positive multiple of the common "
                f"vector (coefficients {coef[..., 0]}, relative residuals {residual})"
            )
        again = compressor.compress(x, k, pinned(compressor, ctx))
        assert torch.equal(first.indices, again.indices) and torch.equal(first.assignment, again.assignment), (
            f"{compressor!r}: identical tokens, K={k}: two calls keep different positions"
        )
        assert torch.equal(first.tokens, again.tokens), f"{compressor!r}: identical tokens, K={k}: two calls differ"


def check_zero_tokens(compressor: Compressor) -> None:
    """All-zero tokens give a valid, finite result whose output tokens are all exactly zero.

    A zero token has no direction: strategies that normalise tokens treat it as the zero vector (cosine
    similarity 0 to everything), never as NaN, and any combination of zero tokens is zero.
    """
    x = torch.zeros(B, N, D)
    ctx = make_context(compressor, x)
    for k in some_budgets(compressor):
        result = compressor.compress(x, k, ctx)
        assert_result_valid(compressor, result, x, k, finite_info=True, what=f"zero tokens, K={k}")
        assert torch.equal(result.tokens, torch.zeros(B, k, D)), (
            f"{compressor!r}: zero tokens, K={k}: the output tokens are not all zero: {result.tokens}"
        )


def check_rank_deficient(compressor: Compressor) -> None:
    """Tokens of rank 2 (copies of two vectors, or random combinations of two) are compressed normally,
    including at budgets above the rank.

    The result is valid and finite at every budget. Every output token lies in the span of the two
    vectors; a strategy whose outputs are averages (``convex_outputs``, the default) keeps every
    coordinate within the inputs' range, and on copies of two vectors ``u``, ``w`` gives points
    ``a u + (1 - a) w`` with ``0 <= a <= 1``. A strategy that returns input tokens unchanged on
    generic tokens at a budget returns exactly ``tokens[indices]`` here too. Picks beyond the rank
    (every remaining token a copy or a combination of those kept) follow the strategy's tie rule and
    never repeat a position.
    """
    convex = compressor.convex_outputs
    budgets = some_budgets(compressor)
    selection = {k: is_selection(compressor, k) for k in budgets}
    for distinct in (True, False):
        x, vectors = rank_two_tokens(distinct)
        what = "copies of two vectors" if distinct else "combinations of two vectors"
        ctx = make_context(compressor, x)
        for k in budgets:
            result = compressor.compress(x, k, ctx)
            assert_result_valid(
                compressor, result, x, k, selection=selection[k], finite_info=True, what=f"{what}, K={k}"
            )
            coef, residual = span_fit(result.tokens, vectors)
            assert bool((residual <= 1e-4).all()), (
                f"{compressor!r}: {what}, K={k}: an output token leaves their span (relative residuals {residual})"
            )
            if convex:
                assert_within_bounds(compressor, result.tokens, x, f"{what}, K={k}")
                if distinct:
                    ok = (coef >= -1e-5).all() & ((coef.sum(-1) - 1).abs() <= 1e-5).all()
                    assert bool(ok), (
                        f"{compressor!r}: {what}, K={k}: an output is not a weighted average of the two "
                        f"(coefficients {coef})"
                    )


def check_single_token(compressor: Compressor) -> None:
    """One token (``N = 1``, a ``1 x 1`` grid) with budget ``1`` or ``1.0`` is kept as it is.

    Position 0 is kept, ``assignment`` is ``[[0]]`` and the output token is exactly the input token. A
    strategy that cannot run on one token as configured (its budget check rejects ``K = 1`` of
    ``N = 1``, e.g. DART with 4 pivots, ApET with 10 basis tokens) raises ``ValueError`` naming itself
    and the limit instead.
    """
    x = make_tokens(n=1)
    ctx = make_context(compressor, x)
    owner = compressor.display_name()
    for budget in (1, 1.0):
        if not accepts(compressor, 1, 1, ctx):
            try:
                compressor.compress(x, budget, ctx)
            except ValueError as exc:
                assert owner in str(exc), f"{compressor!r}: the error for N=1 does not name {owner!r}: {exc}"
                continue
            raise AssertionError(f"{compressor!r}: _check_budget rejects K=1 of N=1, but compress() ran")
        result = compressor.compress(x, budget, ctx)
        assert_result_valid(compressor, result, x, 1, finite_info=True, what=f"N=1, budget {budget!r}")
        zero = torch.zeros(B, 1, dtype=torch.int64)
        assert torch.equal(result.indices, zero), f"{compressor!r}: N=1, budget {budget!r}: indices {result.indices}"
        assert torch.equal(result.assignment, zero), (
            f"{compressor!r}: N=1, budget {budget!r}: assignment {result.assignment}"
        )
        assert torch.equal(result.tokens, x), (
            f"{compressor!r}: N=1, budget {budget!r}: the output {result.tokens} is not the input token {x}"
        )


def check_extreme_magnitudes(compressor: Compressor) -> None:
    """Tokens of extreme magnitude (about 1e-30 and 1e30 in float32, 1e-3 and 2e3 in float16) are
    compressed as well as tokens of magnitude 1.

    The result is valid and finite (tokens and ``info``): squared norms and products of such tokens
    overflow or underflow float32, so kernels compute them on tokens rescaled by a power of two, which
    changes nothing else. The scales are powers of two, so the scaled tokens are exactly proportional.
    A scale-invariant strategy, whose selection depends only on the tokens' directions and ratios, keeps
    the same positions with the same ``assignment`` as at scale 1, and its outputs are those at scale 1
    times the scale (to the output dtype's subnormal spacing): input tokens or their combinations at
    their original magnitude. A strategy is held to that when it declares ``scale_invariant = True``
    (the bundled ones do, except ApET and SparseVLM, whose algorithms hold an absolute constant: the
    ridge, the density ``exp(-d^2)``). A strategy whose outputs are averages (``convex_outputs``, the default)
    returns tokens within the inputs' coordinate range at every scale.
    """
    invariant = compressor.scale_invariant
    convex = compressor.convex_outputs
    for base, scales in ((make_tokens(), _FLOAT32_SCALES), (float16_tokens(), _FLOAT16_SCALES)):
        for k in some_budgets(compressor):
            reference = fresh(compressor).compress(base, k, pinned(compressor, make_context(compressor, base)))
            for scale in scales:
                x = base * scale
                what = f"{base.dtype} tokens scaled by {scale:g}, K={k}"
                assert bool(torch.isfinite(x).all())
                result = fresh(compressor).compress(x, k, pinned(compressor, make_context(compressor, x)))
                assert_result_valid(compressor, result, x, k, finite_info=True, what=what)
                if convex:
                    assert_within_bounds(compressor, result.tokens, x, what)
                if not invariant:
                    continue
                assert torch.equal(result.indices, reference.indices), (
                    f"{compressor!r}: {what}: kept positions differ from scale 1:\n"
                    f"{result.indices}\n{reference.indices}"
                )
                assert torch.equal(result.assignment, reference.assignment), (
                    f"{compressor!r}: {what}: assignment differs from scale 1"
                )
                # outputs that are subnormal in the tokens' dtype (float16 below 6e-5) are rounded to its
                # subnormal spacing: the one difference the output dtype allows
                info = torch.finfo(base.dtype)

                def message(m: str, what: str = what) -> str:
                    return f"{compressor!r}: {what}: the outputs are not those at scale 1 times the scale. {m}"

                torch.testing.assert_close(
                    result.tokens.double(),
                    reference.tokens.double() * scale,
                    rtol=1e-5,
                    atol=info.tiny * info.eps,
                    msg=message,
                )
