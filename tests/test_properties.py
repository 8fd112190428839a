"""Property-based tests (hypothesis) over every registered strategy and a few ApET variants.

Each property is drawn over random batch sizes ``B``, grids ``(h, w)`` (so ``N = h w`` takes small and
non-square values), widths ``D``, float dtypes, legal budgets (``valid_budgets``) and Gaussian tokens
from a seeded generator. The strategy list comes from the registry, so a new strategy is covered the
moment it registers (and :func:`test_every_registered_strategy_is_classified` then asks for its line in
:data:`EQUIVARIANT` or :data:`POSITION_DEPENDENT`).

Properties:

1. ``K`` outputs for an int budget ``K``, and ``max(1, round(f N))`` for a float budget ``f = K / N``
   (the same result as the int budget);
2. ``indices`` int64, strictly ascending (so unique), in ``[0, N)``;
3. ``assignment`` ``[B, N]`` int64 in ``[-1, K)``, ``assignment[indices[k]] == k``;
4. the input's dtype out, every value finite;
5. a deterministic strategy gives the same result twice; a seeded one gives the same result for the
   same seed (two instances);
6. content-only strategies are permutation equivariant (:data:`EQUIVARIANT`, on the inputs of
   :data:`EQUIVARIANCE_DOMAIN` where ties or rounding noise would decide); the position-dependent ones
   (:data:`POSITION_DEPENDENT`) are shown not to be on some input, so the lists stay honest;
7. a batch of equal rows gives equal output rows (deterministic strategies).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import tokencomp as tc
from tokencomp.testing import assert_result_valid, make_context, valid_budgets

# ~20 examples per strategy and property, reproducible (CI runs the same examples every time), no
# example database written into the working tree.
PROFILE = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

Key = Union[str, tuple[str, tuple[tuple[str, object], ...]]]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_H, MAX_W, MAX_D, MAX_B = 7, 9, 16, 3

# ------------------------------------------------------------------------------ which strategies
# Strategies (bare name = default parameters, or (name, params)) whose selection depends on the tokens'
# content only: permuting the N tokens, with their per-token context, permutes the result.
EQUIVARIANT: dict[Key, str] = {
    "cdpruner": "greedy DPP MAP on cosine kernel x relevance to the (unpermuted) text: argmax over content",
    ("dart", (("pivot_order", "norm"),)): (
        "pivots = largest L1 norms, visited by norm, each claims its least cosine-similar free tokens"
    ),
    "dart-llm": "key-norm pivots and cosines read through visual_positions, which move with the tokens",
    "divprune": "greedy max-min cosine distance, first pick by farthest nearest neighbour: all content",
    "fastv": "top-K of the per-token text_attention, which moves with the tokens",
    "pdrop": "top-K of the q/k attention row read through visual_positions, which move with the tokens",
    "prumerge": "plus=False: centres = top [CLS] attention, knn by cosine, extra token at top residual attention",
    "sparsevlm": "scores from cross_attention's N axis (permuted); DPC-KNN on candidates in score order",
    "vispruner": "top [CLS] attention, then duplicate removal on the list in attention order",
    ("apet", (("basis", "qr"), ("injection_order", "rank"), ("num_basis", 2))): (
        "pivoted-QR basis (argmax residual norm), error ranking, basis j into the j-th slot in rank order"
    ),
    ("apet", (("basis", "qr"), ("basis_injection", "none"), ("num_basis", 2))): (
        "pivoted-QR basis and error ranking; no injection, merges by cosine"
    ),
    ("apet-llm", (("basis", "qr"), ("num_basis", 2))): "as apet with basis='qr': stage 2 injects in rank order",
    ("prumerge", (("knn", 3),)): "as prumerge, with neighbours that fit small N",
    ("visionzip", (("contextual", 0), ("order", "position"))): (
        "no contextual tokens: the top-K of [CLS] attention only (the authors' order lists them by position)"
    ),
}


def _apet_basis_not_needed(compressor: tc.Compressor, x: torch.Tensor, k: int) -> bool:
    """The ``M`` basis tokens neither span the tokens (``M < D``) nor are needed to fill the budget."""
    n, d = x.shape[1:]
    m = compressor.num_basis
    return m < d and (k <= n - m or k == n)


def _divprune_first_pick_untied(compressor: tc.Compressor, x: torch.Tensor, k: int) -> bool:
    """The largest nearest-neighbour cosine distance is held by one token only (clear of rounding)."""
    if x.shape[1] < 3:
        return x.shape[1] == 1  # two tokens are each other's nearest neighbour: always a tie
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    sim = u @ u.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    nearest = 1 - sim.amax(dim=-1)  # [B, N] distance to the nearest other token
    top = nearest.topk(2, dim=-1).values
    return bool((top[:, 0] - top[:, 1] > 1e-4).all())


# Where the equivariance above needs more than tie-free Gaussian tokens: (predicate on (compressor,
# tokens, k), reason). Outside it the choice is a tie or rounding noise, which is broken by position.
EQUIVARIANCE_DOMAIN: dict[Key, tuple[Callable[[tc.Compressor, torch.Tensor, int], bool], str]] = {
    "divprune": (
        _divprune_first_pick_untied,
        "the first pick maximises the nearest-neighbour distance, which a mutual nearest pair holds twice "
        "(always for N = 2): the tie goes to the lower position",
    ),
    **{
        key: (
            _apet_basis_not_needed,
            "a basis token's own error is ridge-sized (~1e-6), i.e. float32 rounding noise, so ranking them "
            "(K > N - M) or pivots past the tokens' rank (M >= D) follow positions",
        )
        for key in EQUIVARIANT
        if not isinstance(key, str) and key[0] in ("apet", "apet-llm")
    },
}

# Strategies whose result depends on the token positions, each shown non-equivariant below.
POSITION_DEPENDENT: dict[Key, str] = {
    "apet": "FPS starts at a seeded random position index (fps_start='random')",
    "apet-llm": "FPS starts at a seeded random position index (fps_start='random')",
    "dart": "pivot_order='authors': the pivots claim in the Python-set order of their position indices",
    "pooling": "averages fixed cells of the (h, w) grid",
    "random": "seeded random keys are drawn per position",
    "tome": "bipartite split by alternating positions (A = even, B = odd)",
    "visionzip": "contextual targets are evenly spaced in position order among the non-dominant tokens",
    ("apet", (("basis", "qr"),)): (
        "injection_order='position': basis j lands on the j-th smallest position of the M injected slots"
    ),
    ("apet", (("basis", "random"), ("seed", 3))): "uniform basis positions drawn from the seed",
    ("apet", (("fps_start", 0),)): "FPS starts at the fixed position 0",
    ("prumerge", (("knn", 3), ("plus", True))): "PruMerge+ fills the centres evenly in raster order",
}

# Configurations checked for properties 1-5 and 7: the registry, plus the variants above.
CONFIGS: list[Key] = list(tc.available()) + [
    key for key in {**EQUIVARIANT, **POSITION_DEPENDENT} if not isinstance(key, str)
]


def _key_id(key: Key) -> str:
    if isinstance(key, str):
        return key
    name, params = key
    return name + "[" + ",".join(f"{p}={v}" for p, v in params) + "]"


def _build(key: Key, **extra) -> tc.Compressor:
    if isinstance(key, str):
        return tc.create(key, **extra)
    name, params = key
    return tc.create(name, **{**dict(params), **extra})


# ------------------------------------------------------------------------------ drawing inputs
def _gaussian(b: int, n: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g, dtype=torch.float64).to(dtype)


def _draw_case(data, compressor: tc.Compressor, *, dtypes=DTYPES, min_d: int = 1, same_rows: bool = False):
    """Draw ``(tokens, context, k)`` with a legal budget (the example is rejected when there is none)."""
    b = data.draw(st.integers(1, MAX_B), label="B")
    h = data.draw(st.integers(1, MAX_H), label="h")
    w = data.draw(st.integers(1, MAX_W), label="w")
    d = data.draw(st.integers(min_d, MAX_D), label="D")
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    n = h * w
    x = _gaussian(1 if same_rows else b, n, d, dtype, seed)
    if same_rows:
        x = x.expand(b, n, d).contiguous()
    ctx = make_context(compressor, x, grid=(h, w))
    if same_rows:
        ctx = ctx.select_rows(torch.zeros(b, dtype=torch.int64))  # every row of the context equal to row 0
    budgets = valid_budgets(compressor, n, ctx)
    assume(budgets)
    k = data.draw(st.sampled_from(budgets), label="K")
    return x, ctx, k


def _permute_context(ctx: tc.Context, perm: torch.Tensor) -> tc.Context:
    """``ctx`` for the tokens ``x[b, perm[b]]``: every per-token field follows its token.

    The per-token fields (:meth:`tokencomp.Context.per_token_fields`: attention rows, ``valid``,
    ``visual_positions``, the ``N`` axes of ``image_embeddings`` and ``cross_attention``) are permuted.
    The prompt-wide fields (``keys``, ``query``, ``key_mask``, ``hidden_states`` over the whole prompt,
    the text fields) stay: the visual tokens reach them through ``visual_positions``, which moves with
    the tokens.
    """
    b, n = perm.shape
    out = ctx.take_tokens(perm)
    hs = ctx.hidden_states
    if hs is not None and ctx.visual_positions is None:
        if hs.shape[1] != n:
            raise AssertionError("hidden_states without visual_positions must be the N tokens themselves")
        out = out.replace(hidden_states=torch.gather(hs, 1, perm.unsqueeze(-1).expand(b, n, hs.shape[2])))
    return out


# ------------------------------------------------------------------------------ assertions
def _assert_same(who: str, first, second) -> None:
    assert torch.equal(first.indices, second.indices), f"{who}: indices differ: {first.indices} vs {second.indices}"
    assert torch.equal(first.assignment, second.assignment), f"{who}: assignment differs"
    assert torch.equal(first.tokens, second.tokens), f"{who}: tokens differ"


def _equivariance_violation(
    compressor: tc.Compressor, x: torch.Tensor, ctx: tc.Context, k: int, perm: torch.Tensor
) -> Optional[str]:
    """``None`` when compressing ``x[b, perm[b]]`` gives the permuted result of compressing ``x``, else why not."""
    b, n, d = x.shape
    xp = torch.gather(x, 1, perm.unsqueeze(-1).expand(b, n, d))
    ref = compressor.compress(x, k, ctx)
    out = compressor.compress(xp, k, _permute_context(ctx, perm))
    orig = torch.gather(perm, 1, out.indices)  # original position of every permuted output
    if compressor.output_order == "position":
        pos, order = orig.sort(dim=1)
    else:  # a strategy's own order (PruMerge's: by attention) must follow the content too
        pos, order = orig, torch.arange(k).expand(b, k)
    if not torch.equal(pos, ref.indices):
        return f"kept sets (or, in a strategy's own order, sequences) differ: {ref.indices.tolist()} vs {pos.tolist()}"
    tokens = torch.gather(out.tokens, 1, order.unsqueeze(-1).expand(b, k, d))
    if not torch.allclose(tokens, ref.tokens, rtol=1e-5, atol=1e-6):
        worst = (tokens - ref.tokens).abs().max().item()
        return f"same kept set, output tokens differ (max abs diff {worst:.3g})"
    # assignment: every original token is represented at the same original position (or dropped)
    inv = perm.argsort(dim=1)
    slot_p = torch.gather(out.assignment, 1, inv)  # [B, N] slot, in the permuted output, of original token i
    rep_p = torch.where(slot_p >= 0, torch.gather(orig, 1, slot_p.clamp_min(0)), torch.full_like(slot_p, -1))
    rep = torch.where(
        ref.assignment >= 0, torch.gather(ref.indices, 1, ref.assignment.clamp_min(0)), torch.full_like(slot_p, -1)
    )
    if not torch.equal(rep, rep_p):
        return f"assignment not equivariant: {rep.tolist()} vs {rep_p.tolist()}"
    return None


def _random_perm(b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(b)])


# ------------------------------------------------------------------------------ properties 1-4
@pytest.mark.parametrize("key", CONFIGS, ids=_key_id)
@PROFILE
@given(data=st.data())
def test_int_budget_result_layout(key, data):
    compressor = _build(key)
    x, ctx, k = _draw_case(data, compressor)
    ordered = compressor.output_order == "position"
    assert_result_valid(_key_id(key), compressor.compress(x, k, ctx), x, k, ordered=ordered)


@pytest.mark.parametrize("key", CONFIGS, ids=_key_id)
@PROFILE
@given(data=st.data())
def test_float_budget_keeps_rounded_fraction(key, data):
    compressor = _build(key)
    x, ctx, k = _draw_case(data, compressor)
    n = x.shape[1]
    f = k / n
    assert max(1, round(f * n)) == k
    by_fraction = compressor.compress(x, f, ctx)
    assert_result_valid(_key_id(key), by_fraction, x, k, ordered=compressor.output_order == "position")
    if compressor.deterministic or "seed" in compressor.get_params():
        _assert_same(f"{_key_id(key)} budget {f} vs {k}", by_fraction, compressor.compress(x, k, ctx))


# ------------------------------------------------------------------------------ property 5
@pytest.mark.parametrize("key", CONFIGS, ids=_key_id)
@PROFILE
@given(data=st.data())
def test_repeatable(key, data):
    compressor = _build(key)
    seeded = "seed" in compressor.get_params()
    if not (compressor.deterministic or seeded):
        pytest.skip(f"{_key_id(key)} is neither deterministic nor seeded")
    if seeded:
        seed = data.draw(st.integers(0, 2**31 - 1), label="strategy seed")
        compressor = _build(key, seed=seed)
    x, ctx, k = _draw_case(data, compressor)
    first = compressor.compress(x, k, ctx)
    _assert_same(f"{_key_id(key)} called twice", first, compressor.compress(x, k, ctx))
    if seeded:
        _assert_same(f"{_key_id(key)} same seed, two instances", first, _build(key, seed=seed).compress(x, k, ctx))


# ------------------------------------------------------------------------------ property 6
@pytest.mark.parametrize("key", list(EQUIVARIANT), ids=_key_id)
@PROFILE
@given(data=st.data())
def test_content_only_strategies_are_permutation_equivariant(key, data):
    compressor = _build(key)
    # float32 / float64 Gaussian tokens are tie-free; D = 1 is not (every cosine is +-1)
    x, ctx, k = _draw_case(data, compressor, dtypes=(torch.float32, torch.float64), min_d=2)
    b, n, d = x.shape
    if key in EQUIVARIANCE_DOMAIN:
        assume(EQUIVARIANCE_DOMAIN[key][0](compressor, x, k))
    perm = _random_perm(b, n, data.draw(st.integers(0, 2**31 - 1), label="perm seed"))
    problem = _equivariance_violation(compressor, x, ctx, k, perm)
    assert problem is None, f"{_key_id(key)} (B={b}, N={n}, D={d}, K={k}, {x.dtype}): {problem}"


@pytest.mark.parametrize("key", list(POSITION_DEPENDENT), ids=_key_id)
def test_position_dependent_strategies_are_not_equivariant(key):
    """Some input, budget and permutation changes the result beyond permuting it (the list stays honest)."""
    compressor = _build(key)
    b, (h, w), d = 2, (4, 9), 8
    n = h * w
    for seed in range(3):
        x = _gaussian(b, n, d, torch.float64, seed)
        ctx = make_context(compressor, x, grid=(h, w))
        budgets = valid_budgets(compressor, n, ctx)
        for k in sorted({budgets[len(budgets) // 4], budgets[len(budgets) // 2]}):
            if _equivariance_violation(compressor, x, ctx, k, _random_perm(b, n, seed)) is not None:
                return
    raise AssertionError(f"{_key_id(key)} looked permutation equivariant on every input tried; move it to EQUIVARIANT")


def test_every_registered_strategy_is_classified():
    """A new strategy must be put (with default parameters) in EQUIVARIANT or POSITION_DEPENDENT."""
    bare = {key for key in {**EQUIVARIANT, **POSITION_DEPENDENT} if isinstance(key, str)}
    assert not set(EQUIVARIANT) & set(POSITION_DEPENDENT)
    assert sorted(set(tc.available()) - bare) == []
    assert sorted(bare - set(tc.available())) == []


# ------------------------------------------------------------------------------ property 7
@pytest.mark.parametrize("key", [k for k in CONFIGS if _build(k).deterministic], ids=_key_id)
@PROFILE
@given(data=st.data())
def test_equal_rows_give_equal_outputs(key, data):
    compressor = _build(key)
    x, ctx, k = _draw_case(data, compressor, same_rows=True)
    result = compressor.compress(x, k, ctx)
    who = _key_id(key)
    for name in ("indices", "assignment"):
        value = getattr(result, name)
        assert torch.equal(value, value[:1].expand_as(value)), f"{who}: rows of {name} differ: {value}"
    # Values: equal up to a few units in the last place of the compute dtype (float32 for most
    # strategies, also on float64 tokens). MKL's batched products already differ by one ulp between
    # equal batch rows (torch.bmm on two equal [1, 32] x [32, 13] float32 rows).
    out = result.tokens.double()
    eps = max(torch.finfo(result.tokens.dtype).eps, torch.finfo(torch.float32).eps)
    slack = 4 * eps * (1 + out.abs().max().item())
    worst = (out - out[:1]).abs().max().item()
    assert worst <= slack, f"{who}: rows of tokens differ by {worst:.3g} (> {slack:.3g})"
