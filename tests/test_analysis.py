"""Retention metrics on inputs with known answers."""

from __future__ import annotations

import torch

import tokencomp as tc
from tokencomp.analysis import lstsq_error, recon_error, reconstruct


def test_keeping_everything_is_lossless():
    x = torch.randn(2, 36, 5)
    for name in ("random", "pooling", "apet"):
        params = {"basis_injection": "none"} if name == "apet" else {}
        result = tc.create(name, **params).compress(x, 36)
        torch.testing.assert_close(recon_error(x, result), torch.zeros(2))
        torch.testing.assert_close(lstsq_error(x, result), torch.zeros(2), atol=1e-6, rtol=0)


def test_hand_example_dropped_token_uses_nearest_output():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    result = tc.selection_result(x[None], torch.tensor([[0, 1]]))
    # token 2 (1, 1) is at distance 1 from both outputs: the first, (1, 0), stands for it;
    # token 3 (0, 0) is at distance 1 from both as well. ||X||_F = 2; error = sqrt(1 + 1) / 2.
    rebuilt = reconstruct(x, tc.CompressionResult(result.tokens[0], result.indices[0], result.assignment[0]))
    torch.testing.assert_close(rebuilt, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(recon_error(x[None], result), torch.tensor([2**0.5 / 2]))
    # the two outputs span the plane: the least-squares view loses nothing
    torch.testing.assert_close(lstsq_error(x[None], result), torch.tensor([0.0]), atol=1e-7, rtol=0)


def test_merged_tokens_are_rebuilt_from_their_target():
    x = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [4.0, 0.0]]])
    merged = tc.CompressionResult(
        tokens=torch.tensor([[[3.0, 0.0], [0.0, 2.0]]]),
        indices=torch.tensor([[0, 1]]),
        assignment=torch.tensor([[0, 1, 0]]),
    )
    # rebuilt = (3,0), (0,2), (3,0): errors 1 and 1 over ||X|| = sqrt(24)
    torch.testing.assert_close(recon_error(x, merged), torch.tensor([2**0.5 / 24**0.5]))
    # the span of (3,0) and (0,2) is the plane
    torch.testing.assert_close(lstsq_error(x, merged), torch.tensor([0.0]), atol=1e-7, rtol=0)


def test_lstsq_error_of_rank_one_outputs():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    result = tc.selection_result(x, torch.tensor([[0]]))
    # projecting on span{(1, 0)} loses (0, 1) entirely: error 1 / sqrt(2)
    torch.testing.assert_close(lstsq_error(x, result), torch.tensor([2**-0.5]))


def test_mean_token_attention_proxy():
    from tokencomp.analysis.ablation import mean_token_attention

    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    # mean token (0.25, 0.5); scores X m / sqrt(2) = (0.25, 0.5, 0.75, -0.25) / sqrt(2)
    expected = (torch.tensor([0.25, 0.5, 0.75, -0.25]) / 2**0.5).softmax(-1)
    torch.testing.assert_close(mean_token_attention(x)[0], expected)
