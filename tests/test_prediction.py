"""Prediction agreement: pooled read-outs of compressed tokens against the uncompressed ones."""

from __future__ import annotations

import torch

import tokencomp as tc
from tokencomp.analysis import pooled, pred_agreement


def test_keeping_everything_agrees_fully():
    x = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(0))
    head = torch.nn.Linear(8, 5)
    result = tc.create("random", seed=0).compress(x, 16)
    out = pred_agreement(head, x, result)
    assert out["agree"].tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(out["kl"], torch.zeros(3), atol=1e-6, rtol=0)


def test_weighted_pooling_counts_what_each_output_stands_for():
    # 4 tokens; output 0 stands for inputs 0, 1, 2 (a merge), output 1 for input 3.
    result = tc.CompressionResult(
        tokens=torch.tensor([[[3.0, 0.0], [0.0, 1.0]]]),
        indices=torch.tensor([[0, 3]]),
        assignment=torch.tensor([[0, 0, 0, 1]]),
    )
    torch.testing.assert_close(pooled(result), torch.tensor([[9 / 4, 1 / 4]]))
    torch.testing.assert_close(pooled(result, weighted=False), torch.tensor([[1.5, 0.5]]))
    # dropped inputs (-1) weigh nothing: a selection pools its kept tokens equally
    dropped = tc.CompressionResult(
        tokens=result.tokens, indices=result.indices, assignment=torch.tensor([[0, -1, -1, 1]])
    )
    torch.testing.assert_close(pooled(dropped), torch.tensor([[1.5, 0.5]]))


def test_hand_worked_disagreement():
    # Head = identity on 2 classes. Full mean of [[4,0],[0,1],[0,1],[0,1]] = [1, 0.75] -> class 0.
    # Keeping tokens 1..3 gives mean [0, 1] -> class 1: disagreement, KL = sum p_full log(p_full / p_small).
    x = torch.tensor([[[4.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])
    result = tc.selection_result(x, torch.tensor([[1, 2, 3]]))
    out = pred_agreement(lambda z: z, x, result)
    assert out["agree"].tolist() == [0.0]
    p = torch.tensor([1.0, 0.75]).softmax(-1)
    q = torch.tensor([0.0, 1.0]).softmax(-1)
    torch.testing.assert_close(out["kl"], (p * (p / q).log()).sum()[None])
