"""The two simple references, `random` and `pooling`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tokencomp as tc
from tokencomp.strategies.pooling import pooled_grid


def test_random_is_uniform_subset_from_seed():
    x = torch.randn(3, 50, 4)
    r = tc.create("random", seed=5).compress(x, 7)
    keys = torch.rand(3, 50, generator=torch.Generator().manual_seed(5))
    expected = keys.argsort(dim=-1)[:, :7].sort(dim=-1).values
    assert torch.equal(r.indices, expected)
    assert torch.equal(r.tokens, torch.gather(x, 1, expected[..., None].expand(-1, -1, 4)))
    assert int((r.assignment == -1).sum()) == 3 * 43


def test_random_is_roughly_uniform():
    x = torch.randn(2000, 10, 1)
    counts = torch.zeros(10)
    idx = tc.create("random").compress(x, 3).indices
    counts.index_add_(0, idx.reshape(-1), torch.ones(idx.numel()))
    freq = counts / 2000
    assert torch.allclose(freq, torch.full((10,), 0.3), atol=0.04)


def test_pooling_equals_avg_pool2d_when_divisible():
    x = torch.randn(2, 24 * 24, 5)
    for k, (hp, wp) in [(64, (8, 8)), (144, (12, 12)), (36, (6, 6))]:
        r = tc.create("pooling").compress(x, k)
        grid = x.transpose(1, 2).reshape(2, 5, 24, 24)
        ref = F.avg_pool2d(grid, (24 // hp, 24 // wp)).reshape(2, 5, -1).transpose(1, 2)
        torch.testing.assert_close(r.tokens, ref)


def test_pooling_hand_example():
    # 4x4 grid, values = position; K=4 gives 2x2 cells; cell (0,0) holds 0,1,4,5 -> mean 2.5
    x = torch.arange(16.0).reshape(16, 1)
    r = tc.create("pooling").compress(x, 4)
    assert r.tokens.squeeze(-1).tolist() == [2.5, 4.5, 10.5, 12.5]
    assert r.indices.tolist() == [0, 2, 8, 10]
    assert r.assignment.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]


def test_pooling_non_square_grid_and_budget():
    x = torch.randn(1, 6 * 4, 3)
    r = tc.create("pooling").compress(x, 6, tc.Context(grid=(6, 4)))
    # 6 = 3 x 2 cells of 2 x 2 tokens
    ref = F.avg_pool2d(x.transpose(1, 2).reshape(1, 3, 6, 4), 2).reshape(1, 3, -1).transpose(1, 2)
    torch.testing.assert_close(r.tokens, ref)


def test_pooling_video_grid_pools_each_frame():
    x = torch.randn(1, 2 * 4 * 4, 3)
    r = tc.create("pooling").compress(x, 8, tc.Context(grid=(2, 4, 4)))
    frames = x.reshape(1, 2, 16, 3)
    for t in range(2):
        single = tc.create("pooling").compress(frames[:, t], 4)
        torch.testing.assert_close(r.tokens[:, 4 * t : 4 * t + 4], single.tokens)
        assert (r.indices[:, 4 * t : 4 * t + 4] - 16 * t).tolist() == single.indices.tolist()


def test_pooling_errors():
    with pytest.raises(ValueError, match=r"pooling: needs the token grid; N=15 is not a square"):
        tc.create("pooling").compress(torch.randn(15, 2), 3)
    with pytest.raises(ValueError, match=r"budget K=61 cannot be laid out .* nearest valid budgets: 60, 63"):
        tc.create("pooling").compress(torch.randn(576, 2), 61)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.data())
def test_pooling_outputs_are_means_of_assigned_tokens(h, w, data):
    n = h * w
    x = torch.randn(1, n, 3, generator=torch.Generator().manual_seed(h * 13 + w))
    k = data.draw(st.sampled_from([k for k in range(1, n + 1) if pooled_grid(k, h, w)]))
    r = tc.create("pooling").compress(x, k, tc.Context(grid=(h, w)))
    for slot in range(k):
        members = (r.assignment[0] == slot).nonzero().squeeze(-1)
        assert len(members) > 0 and int(r.indices[0, slot]) in members.tolist()
        torch.testing.assert_close(r.tokens[0, slot], x[0, members].mean(0))


def test_pooled_grid_prefers_grid_aspect():
    assert pooled_grid(64, 24, 24) == (8, 8)
    assert pooled_grid(128, 24, 24) in ((8, 16), (16, 8))
    assert pooled_grid(192, 24, 24) in ((12, 16), (16, 12))
    assert pooled_grid(61, 24, 24) is None
