"""Positional bias: known answers for position-fixed and position-blind selections."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from tokencomp.analysis import kept_heatmap, position_bias


class KeepLast(tc.Compressor):
    deterministic = True

    def _compress(self, tokens, k, context):
        n = tokens.shape[1]
        return tc.selection_result(tokens, torch.arange(n - k, n).expand(tokens.shape[0], k))


class TopNorm(tc.Compressor):
    deterministic = True

    def _compress(self, tokens, k, context):
        return tc.selection_result(tokens, tokens.norm(dim=-1).topk(k, dim=-1).indices.sort(dim=-1).values)


@pytest.mark.parametrize("n,k", [(576, 64), (576, 192), (100, 50)])
def test_keeping_the_last_k_has_the_closed_form_bias(n, k):
    x = torch.randn(4, n, 8, generator=torch.Generator().manual_seed(0))
    bias = position_bias(KeepLast(), x, k)
    assert bias == pytest.approx((n - k) / (2 * n), abs=1 / n)


def test_content_based_selection_is_position_blind_under_shuffling():
    # Real content with a strong positional pattern (norm grows with position): unshuffled, TopNorm keeps
    # the end; shuffled, its picks spread out.
    n = 576
    scale = torch.linspace(0.5, 3.0, n)[None, :, None]
    x = torch.randn(24, n, 16, generator=torch.Generator().manual_seed(1)) * scale
    assert position_bias(TopNorm(), x, 64, repeats=2) < 0.03
    assert position_bias(KeepLast(), x, 64) > 0.4
    keep_all = position_bias(TopNorm(), x, n)
    assert keep_all == pytest.approx(0.0, abs=1e-12)


def test_heatmap():
    indices = torch.tensor([[0, 3], [0, 2]])
    heat = kept_heatmap(indices, 4, grid=(2, 2))
    assert heat.tolist() == [[1.0, 0.0], [0.5, 0.5]]
