"""VisionZip: fidelity to the authors' procedure, a hand-worked example, the budget split, parameters."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from reference_visionzip import literal_visionzip
from tokencomp.strategies.visionzip import default_contextual
from tokencomp.testing import check_compressor


def tokens(b, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g) * (0.5 + torch.rand(b, n, 1, generator=g) * 2)


def attention(b, n, seed):
    """Rows summing to 1 with a heavy upper tail, like ViT [CLS] attention (so IQR outliers exist)."""
    g = torch.Generator().manual_seed(1000 + seed)
    return (torch.randn(b, n, generator=g) * 1.5).softmax(dim=-1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,d,k", [(576, 64, 64), (576, 64, 128), (576, 32, 192), (100, 16, 30), (50, 8, 49)])
def test_default_equals_literal_authors_procedure(seed, n, d, k):
    x, a = tokens(2, n, d, seed), attention(2, n, seed)
    result = tc.create("visionzip").compress(x, k, tc.Context(cls_attention=a))
    c = default_contextual(k)
    for b in range(2):
        positions, values, assignment = literal_visionzip(x[b], a[b], k - c, c)
        assert result.indices[b].tolist() == positions
        assert result.assignment[b].tolist() == assignment
        torch.testing.assert_close(result.tokens[b], values, rtol=1e-5, atol=1e-5)
        assert int(result.info["dominant"][b].sum()) == k - c


@pytest.mark.parametrize("order", ["authors", "position"])
@pytest.mark.parametrize("merge", ["target_plus_mean", "mean"])
@pytest.mark.parametrize("contextual", [0, 1, 7, 20])
@pytest.mark.parametrize("seed", range(2))
def test_variants_equal_literal(merge, contextual, seed, order):
    x, a = tokens(2, 144, 24, seed), attention(2, 144, seed)
    comp = tc.create("visionzip", contextual=contextual, contextual_merge=merge, order=order)
    result = comp.compress(x, 20, tc.Context(cls_attention=a))
    for b in range(2):
        positions, values, assignment = literal_visionzip(x[b], a[b], 20 - contextual, contextual, merge, order)
        assert result.indices[b].tolist() == positions
        assert result.assignment[b].tolist() == assignment
        torch.testing.assert_close(result.tokens[b], values, rtol=1e-5, atol=1e-5)


def test_authors_budget_split():
    # README / paper settings: 54 + 10, 108 + 20, 162 + 30
    assert [default_contextual(k) for k in (64, 128, 192)] == [10, 20, 30]
    assert [default_contextual(k) for k in (1, 2, 3, 4, 6, 7)] == [0, 0, 0, 1, 1, 1]
    x, a = tokens(1, 576, 8, 0), attention(1, 576, 0)
    for k, dom in ((64, 54), (128, 108), (192, 162)):
        result = tc.create("visionzip").compress(x, k, tc.Context(cls_attention=a))
        assert int(result.info["dominant"].sum()) == dom
        top = a[0].topk(dom).indices.sort().values
        assert torch.equal(result.indices[0][result.info["dominant"][0]], top)


def test_hand_worked_example():
    # attention [.10, .30, .05, .25, .15, .15], K=4, contextual=2 -> dominant = top-2 = positions 1, 3.
    # Remaining (ascending) [0, 2, 4, 5]: M = 4, step = 4 // 2 = 2, targets = ranks 0, 2 = positions 0, 4.
    # x2 = (2, 0): cos to x0 = (1, 0) is 1, to x4 = (1, 1) is .71 -> target 0.
    # x5 = (1, 3): cos to x0 is 1/sqrt(10) = .32, to x4 is 4/sqrt(20) = .89 -> target 4.
    # authors' merge: target + mean(assigned): slot@0 = (1,0) + (2,0) = (3,0); slot@4 = (1,1) + (1,3) = (2,4).
    # plain mean: (1.5, 0) and (1, 2).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [1.0, 3.0]])
    ctx = tc.Context(cls_attention=torch.tensor([0.10, 0.30, 0.05, 0.25, 0.15, 0.15]))
    # The authors' order: dominant 1, 3, then contextual 0, 4; order="position" interleaves them.
    result = tc.create("visionzip", contextual=2).compress(x, 4, ctx)
    assert result.indices.tolist() == [1, 3, 0, 4]
    torch.testing.assert_close(result.tokens, torch.tensor([[0.0, 1.0], [0.0, 3.0], [3.0, 0.0], [2.0, 4.0]]))
    assert result.assignment.tolist() == [2, 0, 2, 1, 3, 3]
    assert result.info["dominant"].tolist() == [True, True, False, False]
    result = tc.create("visionzip", contextual=2, order="position").compress(x, 4, ctx)
    assert result.indices.tolist() == [0, 1, 3, 4]
    torch.testing.assert_close(result.tokens, torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 3.0], [2.0, 4.0]]))
    assert result.assignment.tolist() == [0, 1, 0, 2, 3, 3]
    assert result.info["dominant"].tolist() == [False, True, True, False]
    mean = tc.create("visionzip", contextual=2, contextual_merge="mean", order="position").compress(x, 4, ctx)
    torch.testing.assert_close(mean.tokens, torch.tensor([[1.5, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 2.0]]))


def test_target_without_assigned_tokens_stays_unchanged():
    # N = K: every remaining token is a target, nothing is merged; the output is the input.
    x, a = tokens(2, 30, 6, 3), attention(2, 30, 3)
    result = tc.create("visionzip", contextual=5).compress(x, 30, tc.Context(cls_attention=a))
    torch.testing.assert_close(result.tokens, torch.gather(x, 1, result.indices[..., None].expand(-1, -1, 6)))
    by_position = tc.create("visionzip", contextual=5, order="position").compress(x, 30, tc.Context(cls_attention=a))
    torch.testing.assert_close(by_position.tokens, x)


def test_contextual_zero_is_pure_selection():
    x, a = tokens(2, 40, 6, 1), attention(2, 40, 1)
    result = tc.create("visionzip", contextual=0).compress(x, 10, tc.Context(cls_attention=a))
    assert torch.equal(result.indices, a.topk(10, dim=-1).indices.sort(dim=-1).values)
    assert int((result.assignment == -1).sum()) == 2 * 30


def test_rows_are_independent_with_their_own_attention():
    x, a = tokens(3, 64, 12, 0), attention(3, 64, 0)
    comp = tc.create("visionzip")
    whole = comp.compress(x, 16, tc.Context(cls_attention=a))
    for i in range(3):
        part = comp.compress(x[i], 16, tc.Context(cls_attention=a[i]))
        assert torch.equal(part.indices, whole.indices[i])
        assert torch.equal(part.assignment, whole.assignment[i])
        torch.testing.assert_close(part.tokens, whole.tokens[i])


@pytest.mark.parametrize(
    "params,fragment",
    [
        ({"contextual": -1}, "'contextual' must be None or an integer in [0, inf]; got -1."),
        ({"contextual": 2.5}, "'contextual'"),
        ({"contextual": True}, "'contextual'"),
        ({"contextual_merge": "sum"}, "'contextual_merge' must be one of 'target_plus_mean', 'mean'"),
    ],
)
def test_bad_parameters_raise_on_construction(params, fragment):
    with pytest.raises(tc.InvalidParameterError) as err:
        tc.create("visionzip", **params)
    assert fragment in str(err.value)
    assert repr(list(params.values())[0]) in str(err.value)


def test_contextual_above_budget_raises():
    x, a = tokens(1, 50, 8, 0), attention(1, 50, 0)
    with pytest.raises(ValueError, match=r"visionzip: contextual=12 .* budget K=10; contextual must be in \[0, K\]"):
        tc.create("visionzip", contextual=12).compress(x, 10, tc.Context(cls_attention=a))
    assert tc.create("visionzip", contextual=10).compress(x, 10, tc.Context(cls_attention=a)).kept == 10


def test_attention_is_required_and_finite():
    x, a = tokens(1, 20, 4, 0), attention(1, 20, 0)
    with pytest.raises(ValueError, match="visionzip: needs context.cls_attention"):
        tc.create("visionzip").compress(x, 5)
    a[0, 3] = float("nan")
    with pytest.raises(ValueError, match="visionzip: context.cls_attention contains NaN"):
        tc.create("visionzip").compress(x, 5, tc.Context(cls_attention=a))


@pytest.mark.parametrize("params", [{"contextual": 0}, {"contextual": 3}, {"contextual_merge": "mean"}])
def test_variants_conform(params):
    check_compressor(tc.create("visionzip", **params))


@pytest.mark.parametrize("merge", ["target_plus_mean", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_blocked_merge_equals_one_block(monkeypatch, merge, dtype):
    # The others are gathered, matched and added in blocks of rows: tiny blocks (a few rows each) give
    # the same result as one block holding everything.
    import tokencomp.kernels.blocks as blocks

    x, a = tokens(2, 160, 16, 3).to(dtype), attention(2, 160, 3)
    ctx = tc.Context(cls_attention=a)
    comp = tc.create("visionzip", contextual=9, contextual_merge=merge)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1 << 30)
    whole = comp.compress(x, 30, ctx)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 2 * 7 * 16)  # 7 rows a block
    small = comp.compress(x, 30, ctx)
    assert torch.equal(whole.indices, small.indices) and torch.equal(whole.assignment, small.assignment)
    torch.testing.assert_close(whole.tokens, small.tokens)


def test_peak_memory_is_bounded(monkeypatch):
    # 4608 tokens (8 frames), 12.5 % kept, blocks of 64 Ki elements: the ~88 % merged tokens are never
    # gathered whole (the previous kernel did, peaking at 1.2x the input here).
    import tokencomp.kernels.blocks as blocks
    from tokencomp.analysis.measure import peak_memory

    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1 << 16)
    x, a = tokens(1, 4608, 128, 0), attention(1, 4608, 0)
    comp, ctx = tc.create("visionzip"), tc.Context(cls_attention=a)
    _, peak = peak_memory(lambda: comp.compress(x, 576, ctx))
    assert peak < 0.5 * x.numel() * 4  # the output is 0.125x
