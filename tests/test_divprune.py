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
