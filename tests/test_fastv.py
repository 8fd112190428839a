"""FastV against a literal re-statement of the authors' rule, and a hand-worked example."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc


def literal_fastv(attention_last_row: torch.Tensor, k: int) -> list[int]:
    """The authors' rule for one image: topk of the last token's head-averaged attention, then sorted."""
    keep = torch.topk(attention_last_row, k).indices
    return sorted(int(i) for i in keep)


@pytest.mark.parametrize("seed", range(5))
def test_equals_literal_rule(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(3, 60, 8, generator=g)
    # head-averaged attention of the last token, computed from random per-head rows like the model's
    per_head = torch.rand(3, 8, 60, generator=g).softmax(-1)
    row = per_head.mean(1)
    result = tc.create("fastv").compress(tokens, 20, tc.Context(text_attention=row))
    for b in range(3):
        expected = literal_fastv(row[b], 20)
        assert result.indices[b].tolist() == expected
        torch.testing.assert_close(result.tokens[b], tokens[b, expected])


def test_hand_worked_example():
    tokens = torch.arange(5.0).reshape(5, 1)
    attention = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    # top-3 attention: positions 1 (0.4), 3 (0.3), 4 (0.15) -> kept in original order
    result = tc.create("fastv").compress(tokens, 3, tc.Context(text_attention=attention))
    assert result.indices.tolist() == [1, 3, 4]
    assert result.tokens.squeeze(-1).tolist() == [1.0, 3.0, 4.0]
    assert result.assignment.tolist() == [-1, 0, -1, 1, 2]


def test_ties_go_to_lower_position():
    attention = torch.tensor([0.2, 0.2, 0.2, 0.4])
    result = tc.create("fastv").compress(torch.randn(4, 2), 2, tc.Context(text_attention=attention))
    assert result.indices.tolist() == [0, 3]


def test_needs_the_attention_row():
    with pytest.raises(ValueError, match="fastv: needs context.text_attention"):
        tc.create("fastv").compress(torch.randn(10, 3), 4)
    with pytest.raises(tc.InvalidParameterError, match="'layer' must be an integer in \\[1, inf\\]"):
        tc.create("fastv", layer=0)
