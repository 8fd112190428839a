"""LLaVA-PruMerge: fidelity to the authors' procedure, hand-worked examples, the exact-K rule, parameters."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from reference_prumerge import literal_outlier_count, literal_prumerge
from tokencomp.strategies.prumerge import authors_keep_count, iqr_outlier_count
from tokencomp.testing import check_compressor


def tokens(b, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g) * (0.5 + torch.rand(b, n, 1, generator=g) * 2)


def attention(b, n, seed):
    """Rows summing to 1 with a heavy upper tail, like ViT [CLS] attention (so IQR outliers exist)."""
    g = torch.Generator().manual_seed(1000 + seed)
    return (torch.randn(b, n, generator=g) * 1.5).softmax(dim=-1)


def _check_literal(x, a, k, **params):
    result = tc.create("prumerge", **params).compress(x, k, tc.Context(cls_attention=a))
    for b in range(x.shape[0]):
        positions, values, assignment, m = literal_prumerge(x[b], a[b], k, **params)
        assert result.indices[b].tolist() == positions
        assert result.assignment[b].tolist() == assignment
        torch.testing.assert_close(result.tokens[b], values, rtol=1e-5, atol=1e-5)
        assert int(result.info["num_outliers"][b]) == m
    return result


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,d,k", [(576, 64, 64), (576, 32, 16), (100, 16, 40)])
def test_default_equals_literal_authors_procedure(seed, n, d, k):
    _check_literal(tokens(2, n, d, seed), attention(2, n, seed), k)


@pytest.mark.parametrize("order", ["authors", "position"])
@pytest.mark.parametrize("extra_token", [True, False])
@pytest.mark.parametrize("k", [8, 40, 100])
@pytest.mark.parametrize("seed", range(3))
def test_plus_equals_literal(seed, k, extra_token, order):
    x, a = tokens(2, 196, 24, seed), attention(2, 196, seed)
    result = _check_literal(x, a, k, plus=True, extra_token=extra_token, order=order)
    kc = k - int(extra_token)
    m = result.info["num_outliers"]
    assert (m > 0).all()
    # the min(m, K_c) highest-attention tokens are always kept in PruMerge+
    for b in range(2):
        top = set(a[b].topk(min(int(m[b]), kc)).indices.tolist())
        assert top <= set(result.indices[b].tolist())


@pytest.mark.parametrize("order", ["authors", "position"])
@pytest.mark.parametrize("knn", [1, 5, 60])
@pytest.mark.parametrize("seed", range(2))
def test_knn_and_no_extra_token_equal_literal(seed, knn, order):
    x, a = tokens(2, 64, 12, seed), attention(2, 64, seed)
    _check_literal(x, a, 20, knn=knn, extra_token=False, order=order)


def test_outlier_count_equals_numpy_percentile_rule():
    for seed in range(5):
        a = attention(3, 576, seed)
        counts = iqr_outlier_count(a)
        assert counts.tolist() == [literal_outlier_count(a[b]) for b in range(3)]
    # hand-worked: sorted [.05, .05, .1, .1, .1, .1, .2, .3]; Q1 at rank 1.75 = .05 + .75 * .05 = .0875,
    # Q3 at rank 5.25 = .1 + .25 * .1 = .125; bound = .125 + 1.5 * .0375 = .18125 -> .2 and .3 are outliers.
    a = torch.tensor([[0.1, 0.05, 0.3, 0.1, 0.05, 0.1, 0.2, 0.1]])
    assert iqr_outlier_count(a).tolist() == [2]


def test_hand_worked_example():
    # attention [.1, .4, .05, .3, .15], K = 3 with the extra token -> K_c = 2 centres: positions 1 and 3.
    # knn = 1. Centre 1, x1 = (0, 1): cosines to x0 = (1,0), x2 = (1,1), x3 = (2,0), x4 = (1,2) are
    # 0, .71, 0, .89 -> neighbour 4: x1 + .15 * x4 = (0, 1) + (.15, .3) = (.15, 1.3).
    # Centre 3, x3 = (2, 0): cosines to x0, x1, x2, x4 are 1, 0, .71, .45 -> neighbour 0:
    # x3 + .1 * x0 = (2.1, 0).
    # Extra token: .1 * x0 + .05 * x2 + .15 * x4 = (.1 + .05 + .15, .05 + .3) = (.3, .35), at the
    # non-centre position of largest attention, 4.
    # assignment: 0 -> centre 3 (slot 1); 2 -> no centre took it -> extra token (slot 2); 4 -> own slot 2.
    # IQR: Q1 = .1, Q3 = .3, bound = .6 -> no outliers.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [1.0, 2.0]])
    a = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    result = tc.create("prumerge", knn=1).compress(x, 3, tc.Context(cls_attention=a))
    assert result.indices.tolist() == [1, 3, 4]
    torch.testing.assert_close(result.tokens, torch.tensor([[0.15, 1.3], [2.1, 0.0], [0.3, 0.35]]))
    assert result.assignment.tolist() == [1, 0, 2, 1, 2]
    assert result.info["num_outliers"].tolist() == 0
    assert result.info["neighbours"].tolist() == [[4], [0], [-1]]
    # without the extra token, K = 3 centres are 1, 3 and 4 (attention .15); 4's nearest is x2
    # (cos .95 vs x1 .89) -> 4 becomes (1, 2) + .05 * (1, 1); 2 is taken by 4 only -> slot 2.
    plain = tc.create("prumerge", knn=1, extra_token=False).compress(x, 3, tc.Context(cls_attention=a))
    assert plain.indices.tolist() == [1, 3, 4]
    torch.testing.assert_close(plain.tokens, torch.tensor([[0.15, 1.3], [2.1, 0.0], [1.05, 2.05]]))
    assert plain.assignment.tolist() == [1, 0, 2, 1, 2]


def test_plus_fill_hand_worked():
    # attention 1/17 everywhere but 10/17 at position 5: Q1 = Q3 = 1/17, so only position 5 is an
    # outlier (m = 1). K = 4 without the extra token: PruMerge+ keeps 5, then u = 3 evenly spaced of
    # the R = 7 others [0, 1, 2, 3, 4, 6, 7], ranks floor(j * 7 / 3) = 0, 2, 4 -> positions 0, 2, 4.
    # PruMerge keeps the top-4 attention: 5, then the ties 0, 1, 2 (lower positions first).
    a = torch.tensor([1.0, 1, 1, 1, 1, 10, 1, 1]) / 17
    x = tokens(1, 8, 4, 0)[0]
    # The authors' order: the outlier first, then the samples ascending (PruMerge+); the top-4 by
    # attention (PruMerge). order="position" sorts both.
    ctx = tc.Context(cls_attention=a)
    plus = tc.create("prumerge", plus=True, knn=2, extra_token=False).compress(x, 4, ctx)
    assert plus.indices.tolist() == [5, 0, 2, 4]
    assert plus.info["num_outliers"].tolist() == 1
    plain = tc.create("prumerge", knn=2, extra_token=False).compress(x, 4, ctx)
    assert plain.indices.tolist() == [5, 0, 1, 2]
    for variant, is_plus, expected in ((plus, True, [0, 2, 4, 5]), (plain, False, [0, 1, 2, 5])):
        by_position = tc.create("prumerge", plus=is_plus, knn=2, extra_token=False, order="position")
        result = by_position.compress(x, 4, ctx)
        assert result.indices.tolist() == expected
        # the same outputs, each at its own position, in another order
        perm = [variant.indices.tolist().index(p) for p in expected]  # unbatched: [K] indices
        assert torch.equal(result.tokens, variant.tokens[perm])


@pytest.mark.parametrize("n", [196, 576, 729])
def test_num_outliers_is_the_authors_int_of_n_times_ratio(n):
    # outlier_dectection returns count / N; topk takes int(N * ratio), which at N = 729 and 196 is one
    # less than the count for some counts (count 1 of 729 keeps none)
    counts = torch.arange(n + 1)
    expected = [int(n * (c / n)) for c in range(n + 1)]
    assert authors_keep_count(counts, n).tolist() == expected
    assert (authors_keep_count(counts, n) != counts).any() == (n != 576)


def test_extra_token_comes_last_in_the_authors_order():
    x, a = tokens(2, 64, 8, 3), attention(2, 64, 3)
    ctx = tc.Context(cls_attention=a)
    authors = tc.create("prumerge", knn=4).compress(x, 9, ctx)
    by_position = tc.create("prumerge", knn=4, order="position").compress(x, 9, ctx)
    centres = authors.indices[:, :-1]
    assert torch.equal(torch.gather(a, 1, centres), torch.gather(a, 1, centres).sort(dim=1, descending=True).values)
    assert torch.equal(authors.indices.sort(dim=1).values, by_position.indices)
    perm = authors.indices.argsort(dim=1)
    assert torch.equal(torch.gather(authors.tokens, 1, perm[..., None].expand(-1, -1, 8)), by_position.tokens)


def test_plus_with_many_outliers_equals_plain():
    # m >= K_c: both variants keep the K_c highest-attention tokens
    x, a = tokens(2, 576, 16, 0), attention(2, 576, 0)
    assert (iqr_outlier_count(a) > 20).all()
    ctx = tc.Context(cls_attention=a)
    p = tc.create("prumerge", plus=True).compress(x, 20, ctx)
    q = tc.create("prumerge").compress(x, 20, ctx)
    assert torch.equal(p.indices, q.indices) and torch.equal(p.tokens, q.tokens)


def test_budget_one_is_the_extra_token_alone():
    x, a = tokens(2, 40, 6, 2), attention(2, 40, 2)
    result = tc.create("prumerge").compress(x, 1, tc.Context(cls_attention=a))
    torch.testing.assert_close(result.tokens[:, 0], (a.unsqueeze(-1) * x).sum(1))
    assert result.indices[:, 0].tolist() == a.argmax(-1).tolist()
    assert (result.assignment == 0).all()


def test_rows_are_independent_with_their_own_attention():
    x, a = tokens(3, 64, 12, 0), attention(3, 64, 0)
    for plus in (False, True):
        comp = tc.create("prumerge", plus=plus)
        whole = comp.compress(x, 16, tc.Context(cls_attention=a))
        for i in range(3):
            part = comp.compress(x[i], 16, tc.Context(cls_attention=a[i]))
            assert torch.equal(part.indices, whole.indices[i])
            assert torch.equal(part.assignment, whole.assignment[i])
            torch.testing.assert_close(part.tokens, whole.tokens[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_blocked_similarity_equals_unblocked(monkeypatch, dtype):
    # Tiny row blocks (a few centres, and a few half-precision rows, per block) give the same result
    # as one block holding everything.
    import tokencomp.kernels.blocks as blocks

    x, a = tokens(2, 120, 8, 4).to(dtype), attention(2, 120, 4)
    ctx = tc.Context(cls_attention=a)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1 << 30)
    full = tc.create("prumerge", knn=6).compress(x, 50, ctx)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 7 * 120)
    chunked = tc.create("prumerge", knn=6).compress(x, 50, ctx)
    assert torch.equal(full.indices, chunked.indices) and torch.equal(full.assignment, chunked.assignment)
    assert torch.equal(full.info["neighbours"], chunked.info["neighbours"])
    torch.testing.assert_close(full.tokens, chunked.tokens)


@pytest.mark.parametrize("plus", [False, True])
def test_half_precision_tokens_give_the_float32_result_of_their_values(plus):
    # Half-precision tokens take their own path (products read block by block, neighbours summed rank by
    # rank instead of one embedding_bag); on the same values it must agree with the float32 path.
    x, a = tokens(2, 300, 32, 5).half(), attention(2, 300, 5)
    ctx, comp = tc.Context(cls_attention=a), tc.create("prumerge", plus=plus, knn=8)
    half, single = comp.compress(x, 40, ctx), comp.compress(x.float(), 40, ctx)
    assert torch.equal(half.indices, single.indices) and torch.equal(half.assignment, single.assignment)
    assert torch.equal(half.info["neighbours"].sort(-1).values, single.info["neighbours"].sort(-1).values)
    torch.testing.assert_close(half.tokens, single.tokens.half())


def test_peak_memory_is_bounded(monkeypatch):
    # 2304 tokens (4 frames), 12.5 % kept, blocks of 64 Ki elements: beside a few [K, D] rows (the merged
    # tokens, the output), only blocks are allocated (no normalised copy of the tokens, no dense [K, N]
    # weights, no [K, knn, D] neighbour rows).
    import tokencomp.kernels.blocks as blocks
    from tokencomp.analysis.measure import peak_memory

    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1 << 16)
    x, a = tokens(1, 2304, 256, 0), attention(1, 2304, 0)
    comp, ctx = tc.create("prumerge"), tc.Context(cls_attention=a)
    _, peak = peak_memory(lambda: comp.compress(x, 288, ctx))
    assert peak < 0.75 * x.numel() * 4  # the output is 0.125x; the previous kernel peaked at 3.9x here


@pytest.mark.parametrize(
    "params,fragment",
    [
        ({"plus": 1}, "'plus' must be True or False"),
        ({"knn": 0}, "'knn' must be an integer in [1, inf]"),
        ({"knn": 3.0}, "'knn'"),
        ({"extra_token": "yes"}, "'extra_token' must be True or False"),
    ],
)
def test_bad_parameters_raise_on_construction(params, fragment):
    with pytest.raises(tc.InvalidParameterError) as err:
        tc.create("prumerge", **params)
    assert fragment in str(err.value)
    assert repr(list(params.values())[0]) in str(err.value)


def test_too_few_tokens_for_knn_raise():
    x, a = tokens(1, 20, 4, 0), attention(1, 20, 0)
    ctx = tc.Context(cls_attention=a)
    with pytest.raises(ValueError, match=r"prumerge: knn=32 .* got N=20 .* Lower knn to at most 19"):
        tc.create("prumerge").compress(x, 5, ctx)
    assert tc.create("prumerge", knn=19).compress(x, 5, ctx).kept == 5
    assert tc.create("prumerge").compress(x, 1, ctx).kept == 1  # the extra token alone needs no neighbours


def test_attention_is_required_and_finite():
    x, a = tokens(1, 40, 4, 0), attention(1, 40, 0)
    with pytest.raises(ValueError, match="prumerge: needs context.cls_attention"):
        tc.create("prumerge").compress(x, 5)
    a[0, 3] = float("inf")
    with pytest.raises(ValueError, match="prumerge: context.cls_attention contains NaN"):
        tc.create("prumerge").compress(x, 5, tc.Context(cls_attention=a))


@pytest.mark.parametrize(
    "params", [{"plus": True}, {"extra_token": False}, {"plus": True, "extra_token": False, "knn": 3}]
)
def test_variants_conform(params):
    check_compressor(tc.create("prumerge", **params))
