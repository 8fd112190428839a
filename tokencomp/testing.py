"""Conformance checks every strategy must pass, in the manner of scikit-learn's ``check_estimator``.

>>> import tokencomp as tc
>>> from tokencomp.testing import check_compressor
>>> check_compressor(tc.create("random"))

Each check is a plain function ``check(compressor)`` that raises ``AssertionError`` with a message on
failure, or :class:`SkipCheck` with the reason when it does not apply to that compressor (it is then
neither passed nor failed); :func:`all_checks` lists them so a test suite can parametrise over
strategies x checks, and :func:`check_compressor` returns the checks it skipped with their reasons.

A check that compares two results of a randomised strategy (``deterministic = False``) built with
``seed=None`` passes each call a fresh ``Context.generator`` seeded with 0, so the two calls draw the
same random numbers (as scikit-learn's checks pin ``random_state``). A seeded strategy is run as it is.
"""

from __future__ import annotations

import json
from typing import Callable, Iterator, Optional

import torch

from .base import Compressor
from .kernels.gather import batched_gather
from .registry import create, get
from .types import CompressionResult, Context

__all__ = ["SkipCheck", "all_checks", "check_compressor", "make_context", "make_tokens", "valid_budgets"]

_GRID = (8, 8)
_N = _GRID[0] * _GRID[1]
_D = 12
_B = 3


class SkipCheck(Exception):
    """Raised by a check that does not apply to the compressor given; the message is the reason."""


def make_tokens(b: int = _B, n: int = _N, d: int = _D, *, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Reproducible random tokens ``[B, N, D]`` with a little structure (clusters plus noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 4, d, generator=g) * 3
    which = torch.randint(4, (b, n), generator=g)
    x = torch.gather(centres, 1, which.unsqueeze(-1).expand(-1, -1, d)) + torch.randn(b, n, d, generator=g)
    return x.to(dtype)


def make_context(compressor: Compressor, tokens: torch.Tensor, grid: Optional[tuple[int, ...]] = None) -> Context:
    """A valid :class:`Context` for ``compressor`` on ``tokens`` ``[B, N, D]``, built from its ``requires``.

    Every context is given a ``grid`` (``grid`` or a square one when ``N`` is square). Required
    attention fields are random probability rows, text embeddings are random ``[B, 5, D]``. In-LLM
    fields describe a prompt of 3 text tokens, the ``N`` visual tokens and 4 more text tokens (4 heads of
    8 for ``query`` / ``keys``); ``hidden_states`` then covers that whole prompt.
    """
    b, n, d = tokens.shape
    g = torch.Generator().manual_seed(1)
    fields: dict = {}
    side = int(round(n**0.5))
    if grid is not None:
        fields["grid"] = tuple(grid)
    elif side * side == n:
        fields["grid"] = (side, side)
    for name in compressor.requires:
        if name in _PROMPT_FIELDS:
            _add_prompt_fields(fields, tokens, g)
        elif name != "grid":
            fields[name] = _context_field(compressor, name, tokens, g)
    return Context(**fields)


_PROMPT_FIELDS = ("query", "keys", "visual_positions", "key_mask")


def _add_prompt_fields(fields: dict, tokens: torch.Tensor, g: torch.Generator) -> None:
    """The in-LLM fields of a prompt of 3 text tokens, the N visual tokens, then 4 more text tokens; 4
    heads of 8 (each set once)."""
    b, n, _ = tokens.shape
    length = n + 7
    fields.setdefault("query", torch.randn(b, 4, 8, generator=g).to(tokens.device))
    fields.setdefault("keys", torch.randn(b, 4, length, 8, generator=g).to(tokens.device))
    fields.setdefault("visual_positions", (3 + torch.arange(n, device=tokens.device)).expand(b, n).contiguous())
    fields.setdefault("key_mask", torch.ones(b, length, dtype=torch.bool, device=tokens.device))


def _context_field(compressor: Compressor, name: str, tokens: torch.Tensor, g: torch.Generator):
    """The value :func:`make_context` gives the required field ``name`` (not a prompt field, not ``grid``)."""
    b, n, d = tokens.shape
    if name in ("cls_attention", "text_attention"):
        return torch.rand(b, n, generator=g).softmax(-1).to(tokens.device)
    if name == "text_embeddings":
        return torch.randn(b, 5, d, generator=g).to(tokens.device, tokens.dtype)
    if name == "hidden_states":
        if not any(f in compressor.requires for f in _PROMPT_FIELDS):
            return tokens
        # the whole prompt (3 text tokens, the N visual tokens, 4 text tokens), as the keys
        text = torch.randn(b, 7, d, generator=g).to(tokens.device, tokens.dtype)
        return torch.cat([text[:, :3], tokens, text[:, 3:]], dim=1)
    if name == "layer":
        return 2
    if name == "valid":
        return torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    if name == "cross_attention":
        return torch.rand(b, 5, n, generator=g).softmax(-1).to(tokens.device)
    raise AssertionError(f"make_context does not know how to build context.{name}")


def _accepts(compressor: Compressor, k: int, n: int, context: Context) -> bool:
    try:
        compressor._check_budget(k, n, context)
    except ValueError:
        return False
    return True


def valid_budgets(compressor: Compressor, n: int, context: Context) -> list[int]:
    """All ``K`` in ``[1, n]`` that ``compressor`` accepts, as declared by its ``_check_budget``."""
    return [k for k in range(1, n + 1) if _accepts(compressor, k, n, context)]


def _row_of(context: Context, i: int) -> Context:
    """The context of batch row ``i`` alone (batched tensor fields sliced to ``[i:i+1]``)."""
    fields = {}
    for name in Context.field_names():
        value = getattr(context, name)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            value = value[i : i + 1]
        fields[name] = value
    return Context(**fields)


def _pinned(compressor: Compressor, context: Context) -> Context:
    """``context`` with a fresh ``generator`` seeded with 0 when ``compressor`` is randomised and unseeded
    (``seed=None``), so that every call so pinned draws the same random numbers; else ``context``."""
    if compressor.deterministic or getattr(compressor, "seed", None) is not None or context.generator is not None:
        return context
    fields = {f: getattr(context, f) for f in Context.field_names()}
    return Context(**{**fields, "generator": torch.Generator().manual_seed(0)})


def _fresh(compressor: Compressor) -> Compressor:
    return type(compressor)(**compressor.get_params())


def _run(compressor: Compressor, tokens: torch.Tensor, budget, context: Optional[Context] = None) -> CompressionResult:
    if context is None:
        context = make_context(compressor, tokens if tokens.dim() == 3 else tokens.unsqueeze(0))
    return compressor.compress(tokens, budget, _pinned(compressor, context))


def _some_budgets(compressor: Compressor) -> list[int]:
    x = make_tokens()
    budgets = valid_budgets(compressor, _N, make_context(compressor, x))
    assert budgets, f"{compressor!r} accepts no budget at all for N={_N}"
    picks = {budgets[0], budgets[len(budgets) // 2], budgets[-1]}
    return sorted(picks)


def _assert_result_valid(compressor: Compressor, result: CompressionResult, b: int, n: int, k: int, d: int) -> None:
    who = repr(compressor)
    assert tuple(result.tokens.shape) == (b, k, d), f"{who}: tokens shape {tuple(result.tokens.shape)} != {(b, k, d)}"
    assert tuple(result.indices.shape) == (b, k), f"{who}: indices shape {tuple(result.indices.shape)}"
    assert result.indices.dtype == torch.int64, f"{who}: indices dtype {result.indices.dtype}"
    assert result.assignment.dtype == torch.int64, f"{who}: assignment dtype {result.assignment.dtype}"
    assert tuple(result.assignment.shape) == (b, n), f"{who}: assignment shape {tuple(result.assignment.shape)}"
    idx = result.indices
    assert bool(((idx >= 0) & (idx < n)).all()), f"{who}: indices out of [0, {n})"
    if k > 1:
        assert bool((idx[:, 1:] > idx[:, :-1]).all()), f"{who}: indices not strictly ascending: {idx}"
    a = result.assignment
    assert bool(((a >= -1) & (a < k)).all()), f"{who}: assignment outside [-1, {k})"
    own = torch.gather(a, 1, idx)
    assert torch.equal(own, torch.arange(k).expand(b, k)), (
        f"{who}: assignment[indices[k]] must be k (a kept position maps to its own slot)"
    )
    assert bool(torch.isfinite(result.tokens.float()).all()), f"{who}: output tokens are not finite"


# ---------------------------------------------------------------------------- the checks
def check_shapes_and_indices(compressor: Compressor) -> None:
    """Output shapes, indices ascending/unique/in range, assignment consistent with indices."""
    x = make_tokens()
    for k in _some_budgets(compressor):
        result = _run(compressor, x, k)
        _assert_result_valid(compressor, result, _B, _N, k, _D)


def check_float_budget(compressor: Compressor) -> None:
    """A float budget keeps ``max(1, round(f * N))`` tokens, the same as that int budget."""
    x = make_tokens()
    ctx = make_context(compressor, x)
    for k in _some_budgets(compressor):
        f = k / _N
        assert max(1, round(f * _N)) == k
        a = _fresh(compressor).compress(x, f, _pinned(compressor, ctx))
        b = _fresh(compressor).compress(x, k, _pinned(compressor, ctx))
        assert a.kept == k, f"{compressor!r}: budget {f} kept {a.kept}, expected {k}"
        assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens), (
            f"{compressor!r}: float budget {f} and int budget {k} disagree"
        )


def check_dtype_and_device(compressor: Compressor) -> None:
    """The output has the input's dtype and device, for float16, bfloat16, float32 and float64."""
    k = _some_budgets(compressor)[-1]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = make_tokens(dtype=dtype)
        result = _run(compressor, x, k)
        assert result.tokens.dtype == dtype, f"{compressor!r}: {dtype} input gave {result.tokens.dtype} output"
        assert result.tokens.device == x.device
        assert result.indices.device == x.device and result.assignment.device == x.device
        _assert_result_valid(compressor, result, _B, _N, k, _D)


def check_unbatched(compressor: Compressor) -> None:
    """``[N, D]`` input gives the batch-free version of the ``[1, N, D]`` result."""
    x = make_tokens(b=1)
    k = _some_budgets(compressor)[0]
    batched = _run(_fresh(compressor), x, k)
    single = _fresh(compressor).compress(x[0], k, _pinned(compressor, make_context(compressor, x)))
    assert tuple(single.tokens.shape) == (k, _D), f"{compressor!r}: unbatched tokens {tuple(single.tokens.shape)}"
    assert torch.equal(single.indices, batched.indices[0])
    assert torch.equal(single.assignment, batched.assignment[0])
    torch.testing.assert_close(single.tokens, batched.tokens[0])
    for key, value in batched.info.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1:
            assert torch.equal(single.info[key], value[0]), f"{compressor!r}: info[{key!r}] not unbatched"


def check_seeded_determinism(compressor: Compressor) -> None:
    """Two calls, and two instances with the same parameters, give the same result.

    An unseeded randomised strategy is given the same fresh ``Context.generator`` on each call, so this
    checks that it draws all its random numbers from it.
    """
    x = make_tokens()
    k = _some_budgets(compressor)[0]
    first = _run(compressor, x, k)
    again = _run(compressor, x, k)
    other = _run(_fresh(compressor), x, k)
    for r in (again, other):
        assert torch.equal(first.indices, r.indices), f"{compressor!r}: not reproducible (indices)"
        assert torch.equal(first.assignment, r.assignment), f"{compressor!r}: not reproducible (assignment)"
        assert torch.equal(first.tokens, r.tokens), f"{compressor!r}: not reproducible (tokens)"


def check_batch_rows_independent(compressor: Compressor) -> None:
    """For deterministic strategies, row ``b`` of a batch equals compressing row ``b`` alone.

    Skipped for a randomised strategy: a batch draws its rows' random numbers from one stream, so row
    ``b`` alone draws other ones, seeded or not, and there is nothing to compare.
    """
    if not compressor.deterministic:
        raise SkipCheck("randomised (deterministic=False): a row alone draws other random numbers than in a batch")
    x = make_tokens()
    k = _some_budgets(compressor)[0]
    ctx = make_context(compressor, x)
    whole = compressor.compress(x, k, ctx)
    for i in range(_B):
        part = compressor.compress(x[i : i + 1], k, _row_of(ctx, i))
        assert torch.equal(part.indices[0], whole.indices[i]), f"{compressor!r}: row {i} depends on the batch"
        torch.testing.assert_close(part.tokens[0], whole.tokens[i])


def check_get_params_roundtrip(compressor: Compressor) -> None:
    """``get_params`` is JSON-serialisable and rebuilds an equal compressor (also through the registry)."""
    params = compressor.get_params()
    restored = json.loads(json.dumps(params))
    assert restored == params, f"{compressor!r}: get_params() is not JSON round-trippable: {params}"
    rebuilt = type(compressor)(**restored)
    assert rebuilt.get_params() == params
    if compressor.name:
        assert get(compressor.name) is type(compressor), f"{compressor!r}: registered under another class"
        assert create(compressor.name, **restored).get_params() == params
    x = make_tokens()
    k = _some_budgets(compressor)[0]
    a, b = _run(compressor, x, k), _run(rebuilt, x, k)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens)


def check_bad_budgets(compressor: Compressor) -> None:
    """Budgets that are 0, negative, above N, non-numeric or fractions outside (0, 1] raise ValueError."""
    x = make_tokens()
    ctx = make_context(compressor, x)
    owner = compressor.display_name()
    for bad in (0, -1, _N + 1, 0.0, -0.5, 1.5, float("nan"), "8", None, True, [8]):
        try:
            compressor.compress(x, bad, ctx)
        except ValueError as exc:
            assert owner in str(exc), f"{compressor!r}: the error for budget {bad!r} does not name {owner!r}: {exc}"
        else:
            raise AssertionError(f"{compressor!r}: budget {bad!r} was accepted")


def check_bad_tokens(compressor: Compressor) -> None:
    """Integer, 1-D, 4-D and non-finite (NaN, ``+inf``, ``-inf``) tokens raise ValueError."""
    x = make_tokens()
    ctx = make_context(compressor, x)
    non_finite = []
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = x.clone()
        bad[0, 0, 0] = value
        non_finite.append(bad)
    for bad in (x.long(), x[0, 0], x.unsqueeze(0), *non_finite, x.numpy()):
        try:
            compressor.compress(bad, 4, ctx)
        except ValueError:
            pass
        else:
            raise AssertionError(f"{compressor!r}: bad tokens of shape {getattr(bad, 'shape', None)} were accepted")


def check_missing_context(compressor: Compressor) -> None:
    """Each required context field, when missing, raises a ValueError naming it."""
    if not compressor.requires:
        raise SkipCheck("requires no context field")
    x = make_tokens()
    full = make_context(compressor, x)
    k = _some_budgets(compressor)[-1]
    for name in compressor.requires:
        partial = Context(**{f: getattr(full, f) for f in Context.field_names() if f != name})
        try:
            compressor.compress(x, k, partial)
        except ValueError as exc:
            assert name in str(exc), f"{compressor!r}: missing context.{name} error does not name it: {exc}"
        else:
            raise AssertionError(f"{compressor!r}: ran without its required context.{name}")


def check_keep_all(compressor: Compressor) -> None:
    """Keeping every token keeps every position, each mapped to its own slot."""
    x = make_tokens()
    ctx = make_context(compressor, x)
    if not _accepts(compressor, _N, _N, ctx):
        raise SkipCheck(f"rejects the budget K=N={_N} as configured")
    result = compressor.compress(x, _N, ctx)
    assert torch.equal(result.indices, torch.arange(_N).expand(_B, _N))
    assert torch.equal(result.assignment, torch.arange(_N).expand(_B, _N))


# ---------------------------------------------------------------------------- degenerate inputs
# How much the degenerate-input checks below can demand of the output tokens is read from the
# strategy's declarations ``convex_outputs`` and ``scale_invariant`` (see :class:`~tokencomp.Compressor`;
# a property when a parameter decides), never from a list of names.


def _assert_info_finite(compressor: Compressor, result: CompressionResult) -> None:
    for key, value in result.info.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert bool(torch.isfinite(value).all()), f"{compressor!r}: info[{key!r}] is not finite: {value}"


def _assert_degenerate_valid(compressor: Compressor, result: CompressionResult, b: int, n: int, k: int, d: int) -> None:
    _assert_result_valid(compressor, result, b, n, k, d)
    _assert_info_finite(compressor, result)


def _span_fit(out: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares coefficients ``[B, K, V]`` of ``out`` ``[B, K, D]`` on ``vectors`` ``[B, V, D]`` and the
    residual norm of each output token relative to its own norm ``[B, K]`` (float64)."""
    o, a = out.double(), vectors.double()
    coef = torch.linalg.lstsq(a.transpose(1, 2), o.transpose(1, 2)).solution.transpose(1, 2)  # [B, K, V]
    residual = (o - coef @ a).norm(dim=-1)
    return coef, residual / o.norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)


def _assert_within_bounds(compressor: Compressor, out: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """Each coordinate of every output token lies between that coordinate's minimum and maximum over the
    input tokens of its batch row (a necessary condition of a convex combination), to float rounding."""
    o, xd = out.double(), x.double()
    lo, hi = xd.amin(dim=1, keepdim=True), xd.amax(dim=1, keepdim=True)
    tol = 1e-5 * xd.abs().amax(dim=(1, 2), keepdim=True)
    assert bool(((o >= lo - tol) & (o <= hi + tol)).all()), (
        f"{compressor!r}: on {what}, an output token leaves the coordinate range of the input tokens, so it is "
        "not a weighted average of them"
    )


def _is_selection(compressor: Compressor, k: int) -> bool:
    """Whether at budget ``k`` the strategy returns input tokens unchanged (``tokens == x[indices]``) on
    :func:`make_tokens`: the strategies (and budgets) held to it on degenerate tokens too."""
    x = make_tokens()
    result = compressor.compress(x, k, make_context(compressor, x))
    return torch.equal(result.tokens, batched_gather(x, result.indices))


def check_identical_tokens(compressor: Compressor) -> None:
    """Identical tokens (every one of the ``N`` tokens the same vector ``v``) are compressed normally.

    At every budget the result is valid (indices unique, ascending and in range, ``assignment``
    consistent with them, tokens and ``info`` finite), and two calls give the same result. Every output
    token is ``v``: exactly for a strategy that returns input tokens unchanged, to float rounding for
    one that merges (the mean of copies of ``v`` is ``v``). A strategy whose outputs are not averages
    (its ``convex_outputs`` is False: PruMerge's ``x_i + sum_j a_j x_j``, VisionZip's ``target + mean``)
    gives positive multiples ``c v`` instead. Which tokens are kept is the strategy's tie rule; nothing
    divides by the zero spread of the tokens' scores or distances (CDPruner's min-max relevance, for one,
    is 1 for every token then).
    """
    g = torch.Generator().manual_seed(2)
    v = torch.randn(_D, generator=g) * 3
    x = v.expand(_B, _N, _D).contiguous()
    ctx = make_context(compressor, x)
    for k in _some_budgets(compressor):
        first = compressor.compress(x, k, _pinned(compressor, ctx))
        _assert_degenerate_valid(compressor, first, _B, _N, k, _D)
        if _is_selection(compressor, k):
            assert torch.equal(first.tokens, v.expand(_B, k, _D)), (
                f"{compressor!r}: identical tokens, K={k}: a selection's outputs are not exactly the common vector"
            )
        elif compressor.convex_outputs:
            torch.testing.assert_close(
                first.tokens, v.expand(_B, k, _D), rtol=1e-5, atol=1e-5 * float(v.abs().max()),
                msg=lambda m, k=k: (
                    f"{compressor!r}: identical tokens, K={k}: the outputs are not the common vector. {m}"
                ),
            )
        else:
            coef, residual = _span_fit(first.tokens, v.expand(_B, 1, _D))
            assert bool((residual <= 1e-5).all()) and bool((coef > 0).all()), (
                f"{compressor!r}: identical tokens, K={k}: an output is not a positive multiple of the common "
                f"vector (coefficients {coef[..., 0]}, relative residuals {residual})"
            )
        again = compressor.compress(x, k, _pinned(compressor, ctx))
        assert torch.equal(first.indices, again.indices) and torch.equal(first.assignment, again.assignment), (
            f"{compressor!r}: identical tokens, K={k}: two calls keep different positions"
        )
        assert torch.equal(first.tokens, again.tokens), f"{compressor!r}: identical tokens, K={k}: two calls differ"


def check_zero_tokens(compressor: Compressor) -> None:
    """All-zero tokens give a valid, finite result whose output tokens are all exactly zero.

    A zero token has no direction: strategies that normalise tokens treat it as the zero vector (cosine
    similarity 0 to everything), never as NaN, and any combination of zero tokens is zero.
    """
    x = torch.zeros(_B, _N, _D)
    ctx = make_context(compressor, x)
    for k in _some_budgets(compressor):
        result = compressor.compress(x, k, ctx)
        _assert_degenerate_valid(compressor, result, _B, _N, k, _D)
        assert torch.equal(result.tokens, torch.zeros(_B, k, _D)), (
            f"{compressor!r}: zero tokens, K={k}: the output tokens are not all zero: {result.tokens}"
        )


def _rank_two_tokens(distinct: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, N, D]`` tokens spanning two random vectors ``[B, 2, D]``: each token one of the two
    (``distinct=True``, both present) or a random combination of them."""
    g = torch.Generator().manual_seed(3)
    vectors = torch.randn(_B, 2, _D, generator=g) * 3
    if distinct:
        which = torch.randint(2, (_B, _N), generator=g)
        which[:, :2] = torch.tensor([0, 1])
        coef = torch.nn.functional.one_hot(which, 2).float()
    else:
        coef = torch.randn(_B, _N, 2, generator=g)
    return coef @ vectors, vectors


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
    budgets = _some_budgets(compressor)
    selection = {k: _is_selection(compressor, k) for k in budgets}
    for distinct in (True, False):
        x, vectors = _rank_two_tokens(distinct)
        what = "copies of two vectors" if distinct else "combinations of two vectors"
        ctx = make_context(compressor, x)
        for k in budgets:
            result = compressor.compress(x, k, ctx)
            _assert_degenerate_valid(compressor, result, _B, _N, k, _D)
            coef, residual = _span_fit(result.tokens, vectors)
            assert bool((residual <= 1e-4).all()), (
                f"{compressor!r}: {what}, K={k}: an output token leaves their span (relative residuals {residual})"
            )
            if convex:
                _assert_within_bounds(compressor, result.tokens, x, f"{what}, K={k}")
                if distinct:
                    ok = (coef >= -1e-5).all() & ((coef.sum(-1) - 1).abs() <= 1e-5).all()
                    assert bool(ok), (
                        f"{compressor!r}: {what}, K={k}: an output is not a weighted average of the two "
                        f"(coefficients {coef})"
                    )
            if selection[k]:
                assert torch.equal(result.tokens, batched_gather(x, result.indices)), (
                    f"{compressor!r}: {what}, K={k}: a selection's outputs are not the input tokens at indices"
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
        if not _accepts(compressor, 1, 1, ctx):
            try:
                compressor.compress(x, budget, ctx)
            except ValueError as exc:
                assert owner in str(exc), f"{compressor!r}: the error for N=1 does not name {owner!r}: {exc}"
                continue
            raise AssertionError(f"{compressor!r}: _check_budget rejects K=1 of N=1, but compress() ran")
        result = compressor.compress(x, budget, ctx)
        _assert_degenerate_valid(compressor, result, _B, 1, 1, _D)
        zero = torch.zeros(_B, 1, dtype=torch.int64)
        assert torch.equal(result.indices, zero), f"{compressor!r}: N=1, budget {budget!r}: indices {result.indices}"
        assert torch.equal(result.assignment, zero), (
            f"{compressor!r}: N=1, budget {budget!r}: assignment {result.assignment}"
        )
        assert torch.equal(result.tokens, x), (
            f"{compressor!r}: N=1, budget {budget!r}: the output {result.tokens} is not the input token {x}"
        )


# Scales of check_extreme_magnitudes: powers of two, so that the scaled tokens are exactly proportional
# to the originals (about 1e-30 and 1e30 in float32, 1e-3 and 2e3 in float16).
_FLOAT32_SCALES = (2.0**-100, 2.0**100)
_FLOAT16_SCALES = (2.0**-10, 2.0**11)


def _float16_tokens() -> torch.Tensor:
    """:func:`make_tokens` rounded to multiples of 1/8 in float16: exact after scaling by 2^-10 or 2^11."""
    return (make_tokens() * 8).round().div(8).to(torch.float16)


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
    for base, scales in ((make_tokens(), _FLOAT32_SCALES), (_float16_tokens(), _FLOAT16_SCALES)):
        for k in _some_budgets(compressor):
            reference = _fresh(compressor).compress(base, k, _pinned(compressor, make_context(compressor, base)))
            for scale in scales:
                x = base * scale
                what = f"{base.dtype} tokens scaled by {scale:g}, K={k}"
                assert bool(torch.isfinite(x).all())
                result = _fresh(compressor).compress(x, k, _pinned(compressor, make_context(compressor, x)))
                _assert_degenerate_valid(compressor, result, _B, _N, k, _D)
                if convex:
                    _assert_within_bounds(compressor, result.tokens, x, what)
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
                torch.testing.assert_close(
                    result.tokens.double(), reference.tokens.double() * scale, rtol=1e-5, atol=info.tiny * info.eps,
                    msg=lambda m, what=what: (
                        f"{compressor!r}: {what}: the outputs are not those at scale 1 times the scale. {m}"
                    ),
                )


def check_no_host_sync(compressor: Compressor) -> None:
    """``_compress`` runs on the ``meta`` device, so its kernel never waits for the host.

    Meta tensors have shapes but no data: ``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()``,
    ``nonzero`` and every other operation whose result depends on the values fail there. A kernel that
    passes runs on a GPU without a device-to-host synchronisation. Inputs are validated first, on the
    CPU, by :meth:`~tokencomp.Compressor.compress` (validation may synchronise: it has to raise); a
    ``seed`` parameter is set to ``None`` because seeded generators live on a real device.
    """
    params = compressor.get_params()
    if "seed" in params:
        params["seed"] = None
    fresh = type(compressor)(**params)
    x = make_tokens()
    context = make_context(fresh, x)
    k = _some_budgets(fresh)[0]
    fresh.compress(x, k, context)
    batched = fresh._batched_context(context, x, False)
    meta = Context(**{
        name: (value.to("meta") if isinstance(value, torch.Tensor) else value)
        for name in Context.field_names()
        for value in (getattr(batched, name),)
    })
    try:
        result = fresh._compress(x.to("meta"), k, meta)
    except (RuntimeError, NotImplementedError) as exc:
        raise AssertionError(
            f"{compressor!r}: _compress needs the tensors' values on the host (or an operation without a "
            f"meta kernel), so it would stall a GPU: {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    assert result.tokens.device.type == "meta" and tuple(result.tokens.shape) == (_B, k, _D), (
        f"{compressor!r}: on the meta device _compress returned tokens {tuple(result.tokens.shape)} "
        f"on {result.tokens.device}"
    )


def _padded_example(compressor: Compressor) -> tuple[torch.Tensor, torch.Tensor, Context, int]:
    """Tokens ``[3, N, D]`` with padding: row 0 none, row 1 its last 10 positions, row 2 every 5th one."""
    x = make_tokens()
    valid = torch.ones(_B, _N, dtype=torch.bool)
    valid[1, -10:] = False
    valid[2, ::5] = False
    fields = {f: getattr(make_context(compressor, x), f) for f in Context.field_names()}
    context = Context(**{**fields, "grid": None, "valid": valid})
    n_min = int(valid.sum(1).min())
    budgets = [k for k in _some_budgets(compressor) if k <= n_min]
    return x, valid, context, (budgets[len(budgets) // 2] if budgets else 1)


def _alone(context: Context, i: int, keep: torch.Tensor) -> Context:
    """Row ``i``'s context restricted to the token positions ``keep`` ``[N]`` bool (the reference)."""
    token_axis = {"cls_attention": 0, "text_attention": 0, "visual_positions": 0, "cross_attention": 1,
                  "image_embeddings": 0}
    fields = {}
    for name in Context.field_names():
        value = getattr(context, name)
        if name in ("valid", "grid"):
            value = None
        elif isinstance(value, torch.Tensor) and value.dim() >= 1:
            value = value[i]
            if name in token_axis:
                value = value[keep] if token_axis[name] == 0 else value[:, keep]
            value = value.unsqueeze(0)
        fields[name] = value
    return Context(**fields)


def check_padded_batch(compressor: Compressor) -> None:
    """Padding marked by ``Context.valid`` is never kept, merged into or looked at.

    With :attr:`~tokencomp.Compressor.padding` ``"rows"`` or ``"native"``: the kept positions are
    valid ones; padding positions have ``assignment`` ``-1``; changing the padding's values changes
    nothing; a deterministic strategy gives each row what its valid tokens give alone (with the
    per-token context fields at those positions). A budget above a row's valid count raises
    ``ValueError`` naming the row. With ``"unsupported"``, a padded batch raises ``ValueError``.
    """
    who = repr(compressor)
    x, valid, context, k = _padded_example(compressor)
    if compressor.padding == "unsupported":
        try:
            _fresh(compressor).compress(x, k, context)
        except ValueError as exc:
            assert "padded" in str(exc), f"{who}: the padding error does not say so: {exc}"
            return
        raise AssertionError(f"{who}: declares padding='unsupported' but accepted a padded batch")
    result = _fresh(compressor).compress(x, k, _pinned(compressor, context))
    _assert_result_valid(compressor, result, _B, _N, k, _D)
    assert bool(torch.gather(valid, 1, result.indices).all()), f"{who}: kept a padding position"
    assert bool((result.assignment[~valid] == -1).all()), f"{who}: a padding token was assigned to an output slot"
    garbage = x.clone()
    garbage[~valid] = torch.randn(int((~valid).sum()), _D) * 100
    other = _fresh(compressor).compress(garbage, k, _pinned(compressor, context))
    assert torch.equal(result.indices, other.indices) and torch.equal(result.tokens, other.tokens), (
        f"{who}: the values of padding tokens changed the result"
    )
    if compressor.deterministic:
        for i in range(_B):
            alone = _fresh(compressor).compress(x[i : i + 1, valid[i]], k, _alone(context, i, valid[i]))
            positions = valid[i].nonzero().flatten()
            assert torch.equal(positions[alone.indices[0]], result.indices[i]), (
                f"{who}: padded row {i} kept other tokens than its valid tokens alone"
            )
            torch.testing.assert_close(alone.tokens[0], result.tokens[i])
    n_short = int(valid.sum(1).min())
    if _accepts(compressor, n_short + 1, _N, context):
        try:
            _fresh(compressor).compress(x, n_short + 1, context)
        except ValueError as exc:
            assert "row 2" in str(exc) and "valid" in str(exc), f"{who}: the short-row error is unclear: {exc}"
        else:
            raise AssertionError(f"{who}: kept {n_short + 1} tokens of a row with {n_short} valid ones")


def _check_unknown_parameter(compressor: Compressor) -> None:
    """:func:`tokencomp.create` refuses a parameter the registered strategy does not take, naming it."""
    try:
        create(compressor.name, not_a_parameter=1)
    except ValueError as exc:
        assert "not_a_parameter" in str(exc), f"{compressor!r}: the unknown-parameter error does not name it: {exc}"
    else:
        raise AssertionError(f"{compressor!r}: create() accepted an unknown parameter")


def _bad_values(value) -> list:
    """Values a parameter whose valid value is ``value`` must refuse."""
    bad_values: list = [object(), float("nan")]
    if isinstance(value, (str, list, tuple)):
        bad_values.append("no-such-choice")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        bad_values.append(-1)  # every count, layer, ratio, ridge and seed here is non-negative
    return bad_values


def check_bad_parameters(compressor: Compressor) -> None:
    """Unknown parameters and values of the wrong type or out of range raise ``ValueError`` naming them.

    :func:`tokencomp.create` refuses a parameter the strategy does not take and lists those it takes.
    Every parameter refuses an arbitrary object, NaN, ``-1`` when its value is a non-negative number,
    and a string that is no valid choice when its value is a string or a list; the message names the
    parameter.
    """
    cls, who = type(compressor), repr(compressor)
    params = compressor.get_params()
    if not compressor.name and not params:
        raise SkipCheck("unregistered and takes no parameters")
    if compressor.name:
        _check_unknown_parameter(compressor)
    for name, value in params.items():
        for bad in _bad_values(value):
            try:
                cls(**{**params, name: bad})
            except ValueError as exc:
                assert name in str(exc), f"{who}: the error for {name}={bad!r} does not name {name!r}: {exc}"
            except Exception as exc:  # noqa: BLE001 - any other exception type is the failure reported
                raise AssertionError(
                    f"{who}: {name}={bad!r} raised {type(exc).__name__} instead of ValueError: {exc}"
                ) from exc
            else:
                raise AssertionError(f"{who}: accepted {name}={bad!r}")


_CHECKS: tuple[Callable[[Compressor], None], ...] = (
    check_shapes_and_indices,
    check_float_budget,
    check_dtype_and_device,
    check_unbatched,
    check_seeded_determinism,
    check_batch_rows_independent,
    check_get_params_roundtrip,
    check_bad_budgets,
    check_bad_tokens,
    check_bad_parameters,
    check_missing_context,
    check_keep_all,
    check_no_host_sync,
    check_identical_tokens,
    check_zero_tokens,
    check_rank_deficient,
    check_single_token,
    check_extreme_magnitudes,
    check_padded_batch,
)


def all_checks() -> Iterator[Callable[[Compressor], None]]:
    """The conformance checks, each a function of a compressor that may raise :class:`SkipCheck`."""
    return iter(_CHECKS)


def check_compressor(compressor: Compressor) -> list[tuple[str, str]]:
    """Run every conformance check on ``compressor``; raise ``AssertionError`` on the first failure.

    Returns the checks that do not apply to ``compressor`` (they raised :class:`SkipCheck`) as
    ``(check name, reason)`` pairs, in the order of :func:`all_checks`; they are not passed.
    """
    if not isinstance(compressor, Compressor):
        raise TypeError(f"check_compressor expects a tokencomp.Compressor instance; got {type(compressor).__name__}")
    skipped = []
    for check in _CHECKS:
        try:
            check(compressor)
        except SkipCheck as exc:
            skipped.append((check.__name__, str(exc)))
    return skipped
