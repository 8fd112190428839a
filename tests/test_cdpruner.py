"""CDPruner: fidelity to the authors' greedy DPP MAP, a hand-worked example, rank exhaustion, errors."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from reference_cdpruner import literal_cdpruner
from tokencomp.strategies.cdpruner import relevance


def inputs(b, n, d, c, t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g), torch.randn(b, n, c, generator=g), torch.randn(b, t, c, generator=g)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,d,k", [(576, 256, 64), (576, 256, 128), (144, 200, 100), (50, 64, 49)])
def test_equals_literal_authors_procedure(seed, n, d, k):
    x, img, txt = inputs(2, n, d, 32, 3, seed)
    result = tc.create("cdpruner").compress(x, k, tc.Context(text_embeddings=txt, image_embeddings=img))
    for b in range(2):
        picks = literal_cdpruner(x[b], img[b], txt[b], k)
        assert result.info["order"][b].tolist() == picks
        assert result.indices[b].tolist() == sorted(picks)
        torch.testing.assert_close(result.tokens[b], x[b, sorted(picks)])


def test_hand_worked_example():
    # Three tokens: 0 and 1 identical in direction, 2 orthogonal. Text embedding t; relevance
    # r = minmax(-cos(v, t)) with v = tokens: cos = [1, 1, 0] for t = token 0's direction, so -cos =
    # [-1, -1, 0] and r = [1e-6, 1e-6, 1 + 1e-6]. First pick: largest r^2 -> token 2. Second: token 0
    # and 1 tie in gain (r^2, they are orthogonal to token 2); the first index wins -> token 0.
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[[1.0, 0.0]]])
    r = relevance(x[None], text, None)
    torch.testing.assert_close(r, torch.tensor([[1e-6, 1e-6, 1 + 1e-6]]))
    result = tc.create("cdpruner").compress(x, 2, tc.Context(text_embeddings=text[0]))
    assert result.info["order"].tolist() == [2, 0]
    assert result.assignment.tolist() == [0, -1, 1]


def test_diversity_beats_duplicates():
    # Equal relevance (text orthogonal to everything): a DPP never takes a duplicate while a new
    # direction remains.
    base = torch.eye(4)
    x = torch.cat([base, base, base])  # three copies of four directions
    text = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    img = torch.cat([x, torch.zeros(12, 1)], dim=1) + torch.tensor([0, 0, 0, 0, 0.0])
    result = tc.create("cdpruner").compress(x, 4, tc.Context(text_embeddings=text, image_embeddings=img))
    assert sorted(int(i) % 4 for i in result.indices) == [0, 1, 2, 3]


def test_budget_beyond_kernel_rank_is_defined():
    # D = 3, so the kernel has rank 3: from the fourth pick on, picks go by the diagonal r^2.
    x, _, txt = inputs(1, 20, 3, 3, 2, 5)
    result = tc.create("cdpruner").compress(x, 12, tc.Context(text_embeddings=txt))
    assert result.indices.unique().numel() == 12
    assert torch.isfinite(result.tokens).all()
    order = result.info["order"][0].tolist()
    r = result.info["relevance"][0]
    tail = order[4:]  # picked after the span was exhausted (the fourth pick may carry rounding gain)
    assert [float(r[i]) for i in tail] == sorted((float(r[i]) for i in tail), reverse=True)


def test_theta_sharpens_relevance():
    x, img, txt = inputs(1, 30, 8, 8, 2, 0)
    plain = relevance(img, txt, None)
    sharp = relevance(img, txt, 0.5)  # alpha = 0.5
    torch.testing.assert_close(sharp, torch.exp(0.5 * plain))


def test_errors():
    x, img, txt = inputs(1, 10, 8, 4, 2, 0)
    with pytest.raises(ValueError, match="text_embeddings"):
        tc.create("cdpruner").compress(x, 3)
    with pytest.raises(ValueError, match="pass context.image_embeddings"):
        tc.create("cdpruner").compress(x, 3, tc.Context(text_embeddings=txt))
    with pytest.raises(ValueError, match="must share"):
        tc.create("cdpruner").compress(x, 3, tc.Context(text_embeddings=txt, image_embeddings=x))
    for bad in (0.0, 1.0, -0.2, "x"):
        with pytest.raises(tc.InvalidParameterError, match="theta"):
            tc.create("cdpruner", theta=bad)
    assert tc.create("cdpruner", theta=0.3).get_params() == {"theta": 0.3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiny_blocks_give_the_same_result(monkeypatch, dtype):
    # The normalised tokens are built a block of rows at a time: a tiny block changes nothing.
    import tokencomp.kernels.blocks as blocks

    x, img, txt = inputs(2, 300, 48, 16, 3, 9)
    x, img, txt = x.to(dtype), img.to(dtype), txt.to(dtype)
    ctx = tc.Context(text_embeddings=txt, image_embeddings=img)
    ref = tc.create("cdpruner").compress(x, 40, ctx)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 50)
    out = tc.create("cdpruner").compress(x, 40, ctx)
    assert torch.equal(out.info["order"], ref.info["order"])
    assert torch.equal(out.tokens, ref.tokens)


def test_equals_literal_loop_with_the_fallback():
    # The kernel's low-rank form (directions w_i of length D instead of vectors c_i of length N) against
    # the authors' update of the c vectors, with our fallback once no gain is left, past the kernel's rank
    # (D = 16, 40 picks): the same picks, including the diagonal order after the span is exhausted.
    from tokencomp.strategies.cdpruner import _DEGENERATE

    x, img, txt = inputs(3, 200, 16, 8, 2, 4)
    result = tc.create("cdpruner").compress(x, 40, tc.Context(text_embeddings=txt, image_embeddings=img))
    r = relevance(img, txt, None)
    for b in range(3):
        xn = x[b] / x[b].norm(dim=1, keepdim=True)
        kernel = r[b, :, None] * (xn @ xn.t()) * r[b, None, :]
        diag = kernel.diagonal().clone()
        gains, cis, picks = diag.clone(), torch.zeros(40, 200), []
        for i in range(40):
            j = int(gains.argmax())
            if gains[j] <= _DEGENERATE * diag.max():
                j = int(diag.masked_fill(torch.tensor([t in picks for t in range(200)]), float("-inf")).argmax())
                e = torch.zeros(200)
            else:
                e = (kernel[j] - cis[:i, j] @ cis[:i]) / gains[j].sqrt()
            picks.append(j)
            cis[i] = e
            gains = gains - e.square()
            gains[picks] = float("-inf")
        assert result.info["order"][b].tolist() == picks


def test_peak_memory_is_bounded(monkeypatch):
    # The normalised tokens (1x) and k directions of length D; no k vectors of length N (the literal
    # update's k / D = 1.1x the input here, 2.25x at video scale), no N x N kernel.
    import tokencomp.kernels.blocks as blocks
    from tokencomp.analysis.measure import peak_memory

    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1 << 15)
    x, img, txt = inputs(1, 2304, 256, 32, 3, 0)
    ctx = tc.Context(text_embeddings=txt, image_embeddings=img)
    out, peak = peak_memory(lambda: tc.create("cdpruner").compress(x, 288, ctx))
    assert out.indices.shape == (1, 288)
    assert peak < 1.5 * x.numel() * 4
