"""PyramidDrop against a literal re-statement of the authors' rank-and-drop, and a hand example."""

from __future__ import annotations

import math

import pytest
import torch

import tokencomp as tc


def literal_pdrop(query, keys, image_index, image_tokens, keep_length):
    """The authors' inference branch for one image: query [H, Dh], keys [H, L, Dh] (causal prefix)."""
    attn = torch.matmul(query[:, None, :], keys.transpose(1, 2)) / math.sqrt(query.shape[-1])  # [H, 1, L]
    attn = torch.softmax(attn, dim=-1, dtype=torch.float32)
    avg_head = attn.mean(dim=0)[:, image_index : image_index + image_tokens]  # [1, N]
    avg_text = avg_head.mean(dim=0)
    return sorted(int(i) for i in avg_text.topk(keep_length).indices)


@pytest.mark.parametrize("seed", range(5))
def test_equals_literal_rank_and_drop(seed):
    g = torch.Generator().manual_seed(seed)
    b, h, dh, n, pre, post = 2, 4, 16, 40, 5, 7
    tokens = torch.randn(b, n, 12, generator=g)
    query = torch.randn(b, h, dh, generator=g)
    keys = torch.randn(b, h, pre + n + post, dh, generator=g)
    positions = (pre + torch.arange(n)).expand(b, n).contiguous()
    ctx = tc.Context(query=query, keys=keys, visual_positions=positions)
    result = tc.create("pdrop").compress(tokens, 20, ctx)
    for i in range(b):
        expected = literal_pdrop(query[i], keys[i], pre, n, 20)
        assert result.indices[i].tolist() == expected
        torch.testing.assert_close(result.tokens[i], tokens[i, expected])


def test_hand_worked_example():
    # one head, Dh = 1, query 1: logits = keys / 1; the visual tokens are keys 1..3 of 5
    keys = torch.tensor([0.0, 2.0, 0.5, 1.0, 3.0]).reshape(1, 1, 5, 1)
    ctx = tc.Context(query=torch.ones(1, 1, 1), keys=keys, visual_positions=torch.tensor([[1, 2, 3]]))
    result = tc.create("pdrop").compress(torch.arange(3.0).reshape(1, 3, 1), 2, ctx)
    # attention to the visual keys is proportional to exp(2), exp(0.5), exp(1): keep 1st and 3rd
    assert result.indices.tolist() == [[0, 2]]
    expected = torch.tensor([2.0, 0.5, 1.0]).exp() / torch.tensor([0.0, 2.0, 0.5, 1.0, 3.0]).exp().sum()
    torch.testing.assert_close(result.info["scores"][0], expected)


def test_masked_keys_are_excluded_from_the_softmax():
    keys = torch.tensor([9.0, 2.0, 0.5]).reshape(1, 1, 3, 1)
    mask = torch.tensor([[False, True, True]])
    ctx = tc.Context(query=torch.ones(1, 1, 1), keys=keys, visual_positions=torch.tensor([[1, 2]]), key_mask=mask)
    scores = tc.create("pdrop").compress(torch.randn(1, 2, 3), 1, ctx).info["scores"][0]
    torch.testing.assert_close(scores, torch.tensor([2.0, 0.5]).softmax(-1))


def test_schedule_of_the_paper():
    assert tc.create("pdrop").stage_budgets(576) == [288, 144, 72]
    assert tc.create("pdrop").get_params() == {
        "layers": [8, 16, 24],
        "ratio": 0.5,
        "positions": "renumber",
        "compute_dtype": "float32",
    }


@pytest.mark.parametrize("positions", ["renumber", "keep"])
def test_positions_set_the_instance_capability(positions):
    comp = tc.create("pdrop", positions=positions)
    assert comp.in_llm_positions == positions
    assert tc.create("pdrop", **comp.get_params()).in_llm_positions == positions
    assert tc.create("pdrop").in_llm_positions == "renumber"  # the authors' default


@pytest.mark.parametrize(
    "params,fragment",
    [
        ({"layers": [16, 8]}, "strictly increasing"),
        ({"layers": []}, "non-empty"),
        ({"layers": "8"}, "list"),
        ({"layers": [0, 4]}, "'layers'"),
        ({"ratio": 0.0}, "'ratio'"),
        ({"ratio": 1.5}, "'ratio'"),
        ({"positions": "renumbered"}, "parameter 'positions' must be one of 'renumber', 'keep'; got 'renumbered'"),
    ],
)
def test_parameter_errors(params, fragment):
    with pytest.raises(tc.InvalidParameterError, match=fragment):
        tc.create("pdrop", **params)


def test_missing_and_malformed_context():
    x = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="pdrop: needs context.query"):
        tc.create("pdrop").compress(x, 2)
    ctx = tc.Context(query=torch.randn(1, 2, 8), keys=torch.randn(1, 2, 6, 4), visual_positions=torch.arange(4)[None])
    with pytest.raises(ValueError, match="does not match"):
        tc.create("pdrop").compress(x, 2, ctx)
    ctx = tc.Context(
        query=torch.randn(1, 2, 8), keys=torch.randn(1, 2, 6, 8), visual_positions=torch.arange(4)[None] + 3
    )
    with pytest.raises(ValueError, match="must index the L=6 keys"):
        tc.create("pdrop").compress(x, 2, ctx)
