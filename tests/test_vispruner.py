"""VisPruner: fidelity to the authors' procedure, hand-worked examples, the ratio, parameters."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from reference_vispruner import literal_vispruner
from tokencomp.testing import check_compressor


def tokens(b, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g) * (0.5 + torch.rand(b, n, 1, generator=g) * 2)


def attention(b, n, seed):
    """Rows summing to 1 with a heavy upper tail, like ViT [CLS] attention."""
    g = torch.Generator().manual_seed(1000 + seed)
    return (torch.randn(b, n, generator=g) * 1.5).softmax(dim=-1)


def sign_tokens(b, n, d, seed):
    """Entries +-1 with d a power of 4: unit vectors have entries +-1/sqrt(d) and every cosine is an
    exact multiple of 2/d in float32, whatever the summation order, so the ranking of the scores
    cannot depend on rounding (over ~60 rounds of 576 tokens, Gaussian tokens do hit scores equal to
    1e-7, where float32 matmul and a loop of dot products may order them differently). Exact ties are
    frequent instead, which exercises the tie rule."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (b, n, d), generator=g).float() * 2 - 1


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "kind,n,d,k",
    [
        ("sign", 576, 64, 64),
        ("sign", 576, 16, 128),
        ("sign", 576, 64, 192),
        ("sign", 576, 256, 64),  # cosines cached (R0^2 <= 4 N D)
        ("gauss", 100, 16, 30),
        ("gauss", 40, 8, 37),
    ],
)
def test_default_equals_literal_authors_procedure(seed, kind, n, d, k):
    x = sign_tokens(2, n, d, seed) if kind == "sign" else tokens(2, n, d, seed)
    a = attention(2, n, seed)
    result = tc.create("vispruner").compress(x, k, tc.Context(cls_attention=a))
    for b in range(2):
        positions = literal_vispruner(x[b], a[b], k)
        assert result.indices[b].tolist() == positions
        torch.testing.assert_close(result.tokens[b], x[b, positions])
        assert int(result.info["important"][b].sum()) == k // 2


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_ratios_equal_literal(ratio, seed):
    x, a = tokens(2, 196, 24, seed), attention(2, 196, seed)
    result = tc.create("vispruner", important_ratio=ratio).compress(x, 33, tc.Context(cls_attention=a))
    for b in range(2):
        assert result.indices[b].tolist() == literal_vispruner(x[b], a[b], 33, ratio)
        assert int(result.info["important"][b].sum()) == int(33 * ratio)


def test_hand_worked_example_one_round():
    # attention [.05, .30, .02, .20, .11, .15, .08, .09] -> decreasing order 1, 3, 5, 4, 7, 6, 0, 2.
    # K = 6, ratio .5: important = [1, 3, 5]; residual [4, 7, 6, 0, 2], R = 5, K_div = 3, r = 2.
    # A = [4, 6, 2], B = [7, 0] with x7 = (1, 0), x0 = (0, 1):
    #   x4 = (1, .2): max cos = 1 / sqrt(1.04) = .981;  x6 = (.5, .5): .707;  x2 = (.1, 1): .995.
    # Drop the r = 2 highest (2 and 4) -> residual [6, 7, 0] -> keep {1, 3, 5} + {6, 7, 0}.
    x = torch.tensor([[0.0, 1.0], [3.0, 3.0], [0.1, 1.0], [3.0, 3.0], [1.0, 0.2], [3.0, 3.0], [0.5, 0.5], [1.0, 0.0]])
    a = torch.tensor([0.05, 0.30, 0.02, 0.20, 0.11, 0.15, 0.08, 0.09])
    result = tc.create("vispruner").compress(x, 6, tc.Context(cls_attention=a))
    assert result.indices.tolist() == [0, 1, 3, 5, 6, 7]
    assert result.info["important"].tolist() == [False, True, True, True, False, False]
    assert result.assignment.tolist() == [0, 1, -1, 2, -1, 3, 4, 5]
    torch.testing.assert_close(result.tokens, x[[0, 1, 3, 5, 6, 7]])


def test_hand_worked_example_two_rounds():
    # Same tokens and attention, K = 4: important = [1, 3]; residual [5, 4, 7, 6, 0, 2], K_div = 2.
    # Round 1: R = 6, r = min(8, 4) = 4 > |A| = 3, so all of A = [5, 7, 0] goes -> residual [4, 6, 2].
    # Round 2: R = 3, r = 1, A = [4, 2], B = [6] = (.5, .5): cos(x4, x6) = .6 / .721 = .832,
    # cos(x2, x6) = .55 / .711 = .774 -> drop 4 -> residual [2, 6] -> keep {1, 3} + {2, 6}.
    x = torch.tensor([[0.0, 1.0], [3.0, 3.0], [0.1, 1.0], [3.0, 3.0], [1.0, 0.2], [3.0, 3.0], [0.5, 0.5], [1.0, 0.0]])
    a = torch.tensor([0.05, 0.30, 0.02, 0.20, 0.11, 0.15, 0.08, 0.09])
    result = tc.create("vispruner").compress(x, 4, tc.Context(cls_attention=a))
    assert result.indices.tolist() == [1, 2, 3, 6]


def test_full_ratio_is_top_attention():
    x, a = tokens(2, 100, 8, 0), attention(2, 100, 0)
    result = tc.create("vispruner", important_ratio=1.0).compress(x, 25, tc.Context(cls_attention=a))
    assert torch.equal(result.indices, a.topk(25, dim=-1).indices.sort(dim=-1).values)


def test_rows_are_independent_with_their_own_attention():
    x, a = tokens(3, 64, 12, 0), attention(3, 64, 0)
    comp = tc.create("vispruner")
    whole = comp.compress(x, 16, tc.Context(cls_attention=a))
    for i in range(3):
        part = comp.compress(x[i], 16, tc.Context(cls_attention=a[i]))
        assert torch.equal(part.indices, whole.indices[i])
        torch.testing.assert_close(part.tokens, whole.tokens[i])


def test_chunked_similarity_equals_unchunked(monkeypatch):
    import tokencomp.strategies.vispruner as mod

    x, a = tokens(2, 150, 8, 4), attention(2, 150, 4)
    ctx = tc.Context(cls_attention=a)
    full = tc.create("vispruner").compress(x, 40, ctx)
    monkeypatch.setattr(mod, "_CHUNK", 5)
    assert torch.equal(full.indices, tc.create("vispruner").compress(x, 40, ctx).indices)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "half", True])
def test_bad_ratio_raises_on_construction(value):
    with pytest.raises(tc.InvalidParameterError) as err:
        tc.create("vispruner", important_ratio=value)
    assert "'important_ratio' must be a finite number in [0.0, 1.0]" in str(err.value)
    assert repr(value) in str(err.value)


def test_cache_parameter():
    with pytest.raises(tc.InvalidParameterError, match="'cache' must be one of 'auto', 'always', 'never'; got 'yes'"):
        tc.create("vispruner", cache="yes")
    assert tc.create("vispruner", cache="never").get_params() == {
        "important_ratio": 0.5,
        "cache": "never",
        "compute_dtype": "float32",
    }
    # the bench's regimes force each algorithm
    assert tc.get("vispruner").cost_regimes == {"cached": {"cache": "always"}, "recomputed": {"cache": "never"}}


def test_auto_cache_follows_the_memory_bound(monkeypatch):
    # "auto" caches while R0^2 <= 9 N D: here R0 = 100 - 10 = 90 residual tokens, 90^2 = 8100 against
    # 9 * 100 * D: cached for D = 9 (8100), not for D = 8 (7200).
    import tokencomp.strategies.vispruner as mod

    seen = []
    real = torch.bmm
    monkeypatch.setattr(
        mod.torch, "bmm", lambda a, b, **kw: seen.append(tuple(a.shape[1:]) + (b.shape[2],)) or real(a, b, **kw)
    )
    for d, cached in ((9, True), (8, False)):
        seen.clear()
        tc.create("vispruner").compress(tokens(1, 100, d, 1), 20, tc.Context(cls_attention=attention(1, 100, 1)))
        assert ((90, d, 90) in seen) == cached, (d, seen)


def test_attention_is_required_and_finite():
    x, a = tokens(1, 40, 4, 0), attention(1, 40, 0)
    with pytest.raises(ValueError, match="vispruner: needs context.cls_attention"):
        tc.create("vispruner").compress(x, 5)
    a[0, 3] = float("nan")
    with pytest.raises(ValueError, match="vispruner: context.cls_attention contains NaN"):
        tc.create("vispruner").compress(x, 5, tc.Context(cls_attention=a))


@pytest.mark.parametrize("params", [{"important_ratio": 0.0}, {"important_ratio": 0.75}, {"important_ratio": 1.0}])
def test_variants_conform(params):
    check_compressor(tc.create("vispruner", **params))


@pytest.mark.parametrize("kind", ["sign", "gauss"])
@pytest.mark.parametrize(
    "b,n,d,k,ratio,chunk",
    [
        (2, 300, 64, 40, 0.5, 2048),
        (1, 400, 16, 30, 0.0, 2048),
        (2, 257, 64, 100, 0.25, 20),  # last chunks of 1..11 rows: multiplied, not read from the cache
        (3, 120, 16, 13, 0.5, 13),
        (1, 90, 16, 5, 0.0, 5),  # every chunk smaller than a BLAS kernel's minimum
    ],
)
def test_cached_cosines_equal_per_round_products(monkeypatch, kind, b, n, d, k, ratio, chunk):
    """The cached cosine matrix gives bit for bit the scores of the authors' per-round products, so
    the rankings (and near ties in them) are the same: Gaussian tokens included, tiny blocks too."""
    import tokencomp.kernels.blocks as blocks
    import tokencomp.strategies.vispruner as mod

    x = sign_tokens(b, n, d, n) if kind == "sign" else tokens(b, n, d, n)
    ctx = tc.Context(cls_attention=attention(b, n, n))
    never = tc.create("vispruner", important_ratio=ratio, cache="never")  # every round multiplies the tokens
    always = tc.create("vispruner", important_ratio=ratio, cache="always")  # rounds with >= 12 B entries read it
    monkeypatch.setattr(mod, "_CHUNK", chunk)
    products = never.compress(x, k, ctx)
    cached = always.compress(x, k, ctx)
    auto = tc.create("vispruner", important_ratio=ratio).compress(x, k, ctx)  # either, by size
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 700)  # cache read, and products, in blocks of a few rows
    tiny = always.compress(x, k, ctx)
    tiny_products = never.compress(x, k, ctx)
    for other in (cached, auto, tiny, tiny_products):
        assert torch.equal(other.indices, products.indices)
        assert torch.equal(other.assignment, products.assignment)
        assert torch.equal(other.tokens, products.tokens)


def test_half_tokens_select_as_their_float32_copy():
    x, a = tokens(2, 300, 64, 5).half(), attention(2, 300, 5)
    ctx = tc.Context(cls_attention=a)
    half = tc.create("vispruner").compress(x, 40, ctx)
    full = tc.create("vispruner").compress(x.float(), 40, ctx)
    assert half.tokens.dtype == torch.float16
    assert torch.equal(half.indices, full.indices)
    assert torch.equal(half.tokens, x[torch.arange(2)[:, None], half.indices])


@pytest.mark.parametrize("cache", [True, False])
def test_peak_memory_is_bounded(monkeypatch, cache):
    """No copy of all tokens and no per-round copy beyond the gathered A and B, similarities in row
    blocks (made small here): without the cache the extra memory is the unit residual tokens and
    their A and B halves, 2 R0 D floats, and one block; with it, the unit tokens and the R0^2 cosines
    (plus one block of at most an eighth of them). The earlier code also normalised all N tokens and
    held a whole chunk of similarities, and fails this."""
    import tokencomp.kernels.blocks as blocks
    import tokencomp.strategies.vispruner as mod
    from tokencomp.analysis.measure import peak_memory

    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1 << 15)
    n, d, k = 576, 384, 72
    x, a = tokens(1, n, d, 0), attention(1, n, 0)
    assert (n - k // 2) ** 2 <= mod._GRAM_FACTOR * n * d  # "auto" caches at this size
    comp, ctx = tc.create("vispruner", cache="auto" if cache else "never"), tc.Context(cls_attention=a)
    _, peak = peak_memory(lambda: comp.compress(x, k, ctx))
    r0 = n - k // 2
    floats = (r0 * d + 1.125 * r0 * r0) if cache else 2 * r0 * d
    assert peak / 4 < floats + blocks.BLOCK_ELEMENTS + 0.05 * n * d, (peak / 4, floats)
