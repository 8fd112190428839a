"""DivPrune: fidelity to the authors' greedy loop, a hand-worked example, chunking, parameters."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokencomp as tc
from reference_divprune import literal_divprune


def tokens(b, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,d,k", [(576, 64, 64), (576, 32, 192), (100, 16, 30), (40, 8, 39), (30, 4, 1)])
def test_equals_literal_authors_loop(seed, n, d, k):
    x = tokens(2, n, d, seed)
    result = tc.create("divprune").compress(x, k)
    for b in range(2):
        picks = literal_divprune(x[b], k)
        assert result.info["order"][b].tolist() == picks
        assert result.indices[b].tolist() == sorted(picks)
        torch.testing.assert_close(result.tokens[b], x[b, sorted(picks)])


def test_hand_worked_example():
    # Five 2-d tokens at angles 0, 10, 90, 180 and 185 degrees.
    deg = torch.tensor([0.0, 10.0, 90.0, 180.0, 185.0])
    x = torch.stack([torch.cos(deg * math.pi / 180), torch.sin(deg * math.pi / 180)], dim=1)
    # Nearest-neighbour distances: 0 and 1 are 10 deg apart, 3 and 4 are 5 deg apart, token 2 is 80 deg
    # from its nearest (token 1): the first pick is 2. Next, the token farthest from 2 in cosine
    # distance: 1 - cos(95) for token 4 (185 deg) beats 1 - cos(90) for token 0 and 1 - cos(90) for 3.
    # Third: min distance to {2, 4}: token 0 -> min(1 - cos 90, 1 - cos 175) = 1, token 1 -> 1 - cos 80,
    # token 3 -> 1 - cos 5: token 0.
    result = tc.create("divprune").compress(x, 3)
    assert result.info["order"].tolist() == [2, 4, 0]
    assert result.indices.tolist() == [0, 2, 4]
    assert result.assignment.tolist() == [0, -1, 1, -1, 2]


@pytest.mark.parametrize("chunk", [1, 7, 64, 5000])
def test_chunk_does_not_change_the_result(chunk):
    x = tokens(3, 200, 16, 11)
    ref = tc.create("divprune").compress(x, 50)
    out = tc.create("divprune", chunk=chunk).compress(x, 50)
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.info["order"], ref.info["order"])


def test_duplicates_give_distinct_tokens():
    # Ten copies of two directions: after both are picked every remaining token duplicates one of them;
    # the selection must still be k distinct positions.
    x = torch.cat([torch.tensor([[1.0, 0.0]]).expand(10, 2), torch.tensor([[0.0, 1.0]]).expand(10, 2)])
    result = tc.create("divprune").compress(x, 5)
    assert len(set(result.indices.tolist())) == 5
    picked = x[result.info["order"][:2]]
    assert not torch.allclose(picked[0], picked[1])  # the first two picks cover both directions


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), k_frac=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_max_min_property(n, k_frac, seed):
    # Every pick after the first is the remaining token farthest from the picks before it.
    k = max(1, min(n, round(k_frac * n)))
    x = tokens(1, n, 6, seed)[0]
    order = tc.create("divprune").compress(x, k).info["order"].tolist()
    xn = x / x.norm(dim=1, keepdim=True)
    dist = 1 - xn @ xn.t()
    for i in range(1, k):
        rest = [j for j in range(n) if j not in order[:i]]
        scores = dist[order[:i]][:, rest].min(dim=0).values
        assert dist[order[:i], order[i]].min() >= scores.max() - 1e-5


def test_parameters():
    with pytest.raises(tc.InvalidParameterError, match="chunk"):
        tc.create("divprune", chunk=0)
    assert tc.create("divprune", chunk=9).get_params() == {"chunk": 9}
    cls = tc.get("divprune")
    assert (cls.stage, cls.needs_attention, cls.deterministic) == ("pre_llm", False, True)


def test_second_largest_similarity_matches_the_full_matrix():
    # The symmetric tiles and the running top two give exactly the second-largest entry of every column
    # of x x^T, the diagonal included; repeated tokens make a column's maximum appear twice (then it is
    # also the second largest), a zero token has only zeros.
    from tokencomp.kernels import unit_rows
    from tokencomp.strategies.divprune import second_largest_similarity

    x = tokens(2, 130, 8, 3)
    x[0, 40:43] = x[0, 7]
    x[1, 99] = x[1, 0]
    x[1, 5] = 0.0
    xn = unit_rows(x)
    full = (xn @ xn.transpose(1, 2)).topk(2, dim=1).values[:, 1]
    for chunk in (1, 16, 45, 130, 1000):
        torch.testing.assert_close(second_largest_similarity(xn, chunk), full, rtol=0, atol=1e-6)
    second = second_largest_similarity(xn, 45)
    torch.testing.assert_close(second[0, [7, 40, 41, 42]], torch.ones(4))  # a copy is the second largest
    assert second[0, :7].max() < 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiny_blocks_give_the_same_result(monkeypatch, dtype):
    # Blocks are a memory bound only: a block of a few rows (and tiles of a few rows) picks the same.
    import tokencomp.kernels.blocks as blocks

    x = tokens(2, 150, 24, 5).to(dtype)
    ref = tc.create("divprune").compress(x, 40)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 100)
    for chunk in (1, 33, 1024):
        out = tc.create("divprune", chunk=chunk).compress(x, 40)
        assert torch.equal(out.info["order"], ref.info["order"])
        assert torch.equal(out.tokens, ref.tokens)


def test_peak_memory_is_bounded(monkeypatch):
    # Beyond the float32 normalised tokens (1x), only tiles of BLOCK_ELEMENTS and [B, N] vectors:
    # no column block of all N rows, no [N, N] matrix (the authors' 12x the input here).
    import tokencomp.kernels.blocks as blocks
    from tokencomp.analysis.measure import peak_memory

    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1 << 15)
    x = tokens(1, 1536, 128, 0)
    out, peak = peak_memory(lambda: tc.create("divprune", chunk=256).compress(x, 192))
    assert out.indices.shape == (1, 192)
    assert peak < 2 * x.numel() * 4
