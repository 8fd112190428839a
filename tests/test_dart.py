"""DART (pre-LLM and at an LLM layer): fidelity to the authors' rule, hand-worked example, parameters."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from reference_dart import literal_dart
from tokencomp.strategies.dart import claim_quotas


def prompt(b, n, d, seed, before=5, after=9, heads=4, dh=8):
    """Keys [B,H,L,Dh] and normed states [B,L,D] for a prompt: `before` text, n image, `after` text."""
    g = torch.Generator().manual_seed(seed)
    length = before + n + after
    keys = torch.randn(b, heads, length, dh, generator=g) * (0.5 + torch.rand(b, 1, length, 1, generator=g))
    states = torch.randn(b, length, d, generator=g)
    positions = (before + torch.arange(n)).expand(b, n).contiguous()
    return keys, states, positions


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,k", [(576, 132), (576, 68), (576, 196), (64, 12), (64, 60)])
def test_llm_equals_literal_authors_rule(seed, n, k):
    # k = 4 + 8 t is the authors' rule with max_num_trunction = 8 t exactly.
    keys, states, positions = prompt(2, n, 32, seed)
    tokens = states[:, 5 : 5 + n] * 3.0  # the un-normed states the model continues with
    ctx = tc.Context(keys=keys, hidden_states=states, visual_positions=positions)
    result = tc.create("dart-llm").compress(tokens, k, ctx)
    for b in range(2):
        kept = literal_dart(keys[b], states[b], 5, n, 4, 4, max_num_trunction=k - 4)
        assert [p + 5 for p in result.indices[b].tolist()] == kept
        torch.testing.assert_close(result.tokens[b], tokens[b, result.indices[b]])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [5, 37, 100, 575])
def test_llm_exact_budget_equals_literal_with_quotas(seed, k):
    n = 576
    keys, states, positions = prompt(1, n, 16, seed)
    ctx = tc.Context(keys=keys, hidden_states=states, visual_positions=positions)
    result = tc.create("dart-llm").compress(states[:, 5 : 5 + n], k, ctx)
    kept = literal_dart(keys[0], states[0], 5, n, 4, 4, quotas=claim_quotas(k - 4, 8))
    assert [p + 5 for p in result.indices[0].tolist()] == kept


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("pivots,k", [(4, 64), (4, 128), (1, 10), (8, 200)])
def test_pre_llm_equals_literal_on_features(seed, pivots, k):
    # Before the LLM the tokens are both the "keys" (one head) and the similarity states; no text pivots.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 576, 24, generator=g) * (0.5 + torch.rand(2, 576, 1, generator=g))
    result = tc.create("dart", pivot_image_tokens=pivots).compress(x, k)
    for b in range(2):
        kept = literal_dart(x[b][None], x[b], 0, 576, pivots, 0, quotas=claim_quotas(k - pivots, pivots))
        assert result.indices[b].tolist() == kept


def test_quotas():
    assert claim_quotas(128, 8) == [16] * 8
    assert claim_quotas(10, 4) == [3, 3, 2, 2]
    assert claim_quotas(3, 8) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert claim_quotas(0, 2) == [0, 0]


def test_hand_worked_example():
    # Six 2-d tokens; token 0 has the largest L1 norm, so it is the one pivot. Angles (deg) from it:
    # token1 10, token2 100, token3 170, token4 60, token5 175. With k = 3 the pivot claims the two least
    # similar: tokens 5 (175 deg) and 3 (170 deg).
    import math

    angles = [0, 10, 100, 170, 60, 175]
    x = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])
    x[0] *= 3.0
    result = tc.create("dart", pivot_image_tokens=1).compress(x, 3)
    assert result.indices.tolist() == [0, 3, 5]
    assert result.assignment.tolist() == [0, -1, -1, 1, -1, 2]
    assert result.info["pivots"].tolist() == [0]
    # k = 4: next least similar is token 2 (100 deg).
    assert tc.create("dart", pivot_image_tokens=1).compress(x, 4).indices.tolist() == [0, 2, 3, 5]


def test_text_pivots_respect_key_mask_and_come_after_the_image():
    keys, states, positions = prompt(1, 16, 8, 0, before=3, after=6)
    big = keys.clone()
    big[:, :, 0] *= 100  # a huge key before the image must not become a text pivot
    big[:, :, -1] *= 100  # nor a masked padding position
    mask = torch.ones(1, keys.shape[2], dtype=torch.bool)
    mask[0, -1] = False
    ctx = tc.Context(keys=big, hidden_states=states, visual_positions=positions, key_mask=mask)
    result = tc.create("dart-llm", pivot_text_tokens=5).compress(states[:, 3:19], 8, ctx)
    text = result.info["text_pivots"][0].tolist()
    assert sorted(text) == [19, 20, 21, 22, 23]


def test_errors():
    with pytest.raises(tc.InvalidParameterError, match="pivot_image_tokens"):
        tc.create("dart", pivot_image_tokens=0)
    with pytest.raises(tc.InvalidParameterError, match="layer"):
        tc.create("dart-llm", layer=0)
    with pytest.raises(ValueError, match="below pivot_image_tokens=4"):
        tc.create("dart").compress(torch.randn(20, 4), 3)
    keys, states, positions = prompt(1, 16, 8, 0, after=2)
    ctx = tc.Context(keys=keys, hidden_states=states, visual_positions=positions)
    with pytest.raises(ValueError, match="only 2 valid token"):
        tc.create("dart-llm").compress(states[:, 5:21], 8, ctx)
    with pytest.raises(ValueError, match="hidden_states"):
        tc.create("dart-llm").compress(states[:, 5:21], 8, tc.Context(keys=keys, visual_positions=positions))
    short = tc.Context(keys=keys, hidden_states=states[:, :-1], visual_positions=positions)
    with pytest.raises(ValueError, match="same L="):
        tc.create("dart-llm", pivot_text_tokens=1).compress(states[:, 5:21], 8, short)
    assert tc.create("dart-llm").get_params() == {"layer": 2, "pivot_image_tokens": 4, "pivot_text_tokens": 4}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_blocked_norms_and_products_equal_one_block(monkeypatch, dtype):
    # L1 norms (features and keys) and half-precision products run over blocks of rows: tiny blocks
    # give the same kept tokens as one block holding everything.
    import tokencomp.kernels.blocks as blocks

    keys, states, positions = prompt(2, 100, 16, 5)
    keys, states = keys.to(dtype), states.to(dtype)
    x = states[:, 5:105]
    ctx = tc.Context(keys=keys, hidden_states=states, visual_positions=positions)
    runs = []
    for elements in (1 << 30, 2 * 3 * 32):
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", elements)
        runs.append((tc.create("dart").compress(x, 30), tc.create("dart-llm").compress(x, 30, ctx)))
    for whole, small in zip(*runs):
        assert torch.equal(whole.indices, small.indices)
        assert torch.equal(whole.tokens, small.tokens)


def test_peak_memory_is_bounded(monkeypatch):
    # 4608 tokens (8 frames), 12.5 % kept, blocks of 64 Ki elements: no normalised or absolute-valued
    # copy of the tokens, no gathered [B, N, D] image states (the previous kernels peaked at 1x / 2x).
    import tokencomp.kernels.blocks as blocks
    from tokencomp.analysis.measure import peak_memory

    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1 << 16)
    n = 4608
    keys, states, positions = prompt(1, n, 256, 0)
    x = states[:, 5 : 5 + n].contiguous()
    ctx = tc.Context(keys=keys, hidden_states=states, visual_positions=positions)
    size = x.numel() * 4
    _, peak = peak_memory(lambda: tc.create("dart").compress(x, n // 8))
    assert peak < 0.3 * size  # the output is 0.125x
    # dart-llm's kernel alone: compress()'s validation (finite hidden states) is not part of it
    comp = tc.create("dart-llm")
    _, peak = peak_memory(lambda: comp._compress(x, n // 8, ctx))
    assert peak < 0.3 * size
