"""DART (pre-LLM and at an LLM layer): fidelity to the authors' rule, hand-worked example, parameters."""

from __future__ import annotations

import random

import pytest
import torch

import tokencomp as tc
from reference_dart import authors_dart, authors_kept_count, literal_dart
from tokencomp.strategies.dart import claim_quotas, python_set_order


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
        norm = tc.create("dart-llm", pivot_order="norm").compress(tokens, k, ctx)
        kept = literal_dart(keys[b], states[b], 5, n, 4, 4, max_num_trunction=k - 4, set_order=False)
        assert [p + 5 for p in norm.indices[b].tolist()] == kept
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
    norm = tc.create("dart", pivot_image_tokens=pivots, pivot_order="norm").compress(x, k)
    for b in range(2):
        quotas = claim_quotas(k - pivots, pivots)
        assert norm.indices[b].tolist() == literal_dart(
            x[b][None], x[b], 0, 576, pivots, 0, quotas=quotas, set_order=False
        )


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
    with pytest.raises(tc.InvalidParameterError, match="pivot_order"):
        tc.create("dart-llm", pivot_order="set")
    assert tc.create("dart-llm").get_params() == {
        "layer": 2,
        "pivot_image_tokens": 4,
        "pivot_text_tokens": 4,
        "pivot_order": "authors",
    }


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


# --- the authors' pivot visiting order: CPython's set layout -----------------------------------------


def _random_rows(rng, count, bound, colliding):
    """Distinct non-negative keys; ``colliding`` draws them sharing their low bits (one of 4 residues mod
    32), so that homes collide, linear probes run off the table's end and perturbed jumps are taken."""
    if not colliding:
        return rng.sample(range(bound), count)
    seen: dict[int, None] = {}
    while len(seen) < count:
        seen[(rng.randrange(4) + 32 * rng.randrange(max(1, bound // 32))) % bound] = None
    return list(seen)


@pytest.mark.parametrize("colliding", [False, True])
@pytest.mark.parametrize("count", [1, 4, 5, 8, 13, 40])
def test_python_set_order_is_cpythons(count, colliding):
    # The reference is the running interpreter's own set.
    rng = random.Random(count * 2 + colliding)
    for bound in (64, 611 + 40, 5000, 2**40):
        if 4 * (bound // 32) < 2 * count:  # too few colliding keys to draw from
            continue
        rows = [_random_rows(rng, count, bound, colliding) for _ in range(64)]
        order = python_set_order(torch.tensor(rows), bound)
        for row, columns in zip(rows, order.tolist()):
            assert [row[c] for c in columns] == list(set(row))


def test_python_set_order_hand_worked():
    # Inserted 64, 3, 32, 0, 35 into 8 slots (mask 7, no linear probes fit): 64 -> 0, 3 -> 3, 32 -> home 0
    # taken, jump 0*5+1+(32>>5) = 2; 0 -> jump to 1; 35 -> 3 taken, jump 17&7 = 1 taken, then 6. The 5th
    # insertion fills 3/5: rebuilt in 32 slots in slot order 64, 0, 32, 3, 35 -> 0, 1 (linear), 2, 3, 4;
    # then 99 -> 3, 4 taken, 5; 1 -> 6; 2 -> 7.
    keys = [64, 3, 32, 0, 35, 99, 1, 2]
    assert list(set(keys)) == [64, 0, 32, 3, 35, 99, 1, 2]
    order = python_set_order(torch.tensor([keys]), 100)[0].tolist()
    assert [keys[c] for c in order] == [64, 0, 32, 3, 35, 99, 1, 2]


def llava_prompt(seed, start=35, after=40):
    """LLaVA-1.5 shapes: 35 system tokens, 576 image tokens, an instruction; 32 heads."""
    return prompt(1, 576, 64, seed, before=start, after=after, heads=8, dh=16)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("setting", [128, 64, 32])
def test_llm_equals_authors_code_kept_set_and_visiting_order(seed, setting):
    # Their code as written (set order, one TOKEN_TOPK) against ours at authors_budget(setting).
    keys, states, positions = llava_prompt(seed)
    comp = tc.create("dart-llm")
    k = comp.authors_budget(setting)
    ctx = tc.Context(keys=keys, hidden_states=states, visual_positions=positions)
    result = comp.compress(states[:, 35:611], k, ctx)
    kept, visited = authors_dart(keys[0], states[0], 35, 576, 4, 4, max_num_trunction=setting)
    assert [p + 35 for p in result.indices[0].tolist()] == kept
    rows = torch.cat([result.info["pivots"][0] + 35, result.info["text_pivots"][0]])
    assert rows[result.info["pivot_order"][0]].tolist() == visited
    assert len(kept) == k


@pytest.mark.parametrize("seed", range(3))
def test_llm_set_order_with_left_padding_is_that_of_the_unpadded_prompt(seed):
    # A left-padded row hashes its pivots at their unpadded positions, as the authors' batch of one.
    keys, states, positions = llava_prompt(seed)
    pad = 7
    keys_p = torch.cat([torch.randn(1, keys.shape[1], pad, keys.shape[3]) * 50, keys], dim=2)
    states_p = torch.cat([torch.randn(1, pad, states.shape[2]), states], dim=1)
    mask = torch.ones(1, keys_p.shape[2], dtype=torch.bool)
    mask[0, :pad] = False
    ctx = tc.Context(keys=keys_p, hidden_states=states_p, visual_positions=positions + pad, key_mask=mask)
    result = tc.create("dart-llm").compress(states[:, 35:611], 132, ctx)
    kept, visited = authors_dart(keys[0], states[0], 35, 576, 4, 4, max_num_trunction=128)
    assert [p + 35 for p in result.indices[0].tolist()] == kept
    rows = torch.cat([result.info["pivots"][0] + 35, result.info["text_pivots"][0] - pad])
    assert rows[result.info["pivot_order"][0]].tolist() == visited


@pytest.mark.parametrize("seed", range(3))
def test_set_order_differs_from_norm_order(seed):
    # The option is not cosmetic: the two orders claim different tokens on LLaVA-1.5 shapes.
    keys, states, positions = llava_prompt(seed)
    ctx = tc.Context(keys=keys, hidden_states=states, visual_positions=positions)
    a = tc.create("dart-llm").compress(states[:, 35:611], 132, ctx)
    b = tc.create("dart-llm", pivot_order="norm").compress(states[:, 35:611], 132, ctx)
    assert not torch.equal(a.info["pivot_order"], b.info["pivot_order"])
    assert not torch.equal(a.indices, b.indices)


def test_pre_llm_visits_in_set_order_of_feature_indices():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 576, 24, generator=g)
    result = tc.create("dart").compress(x, 132)
    for b in range(3):
        pivots = result.info["pivots"][b].tolist()
        assert [pivots[c] for c in result.info["pivot_order"][b].tolist()] == list(set(pivots))


# --- the authors' budget -----------------------------------------------------------------------------


@pytest.mark.parametrize("setting", [0, 7, 8, 32, 64, 100, 128, 200, 568])
@pytest.mark.parametrize("pivots", [(4, 4), (4, 0), (2, 6), (8, 8)])
def test_authors_budget_is_their_arithmetic(setting, pivots):
    image, text = pivots
    comp = tc.create("dart-llm", pivot_image_tokens=image, pivot_text_tokens=text)
    expected = authors_kept_count(576, image, text, max_num_trunction=setting)
    if expected > 576:
        with pytest.raises(ValueError, match="more than the n=576"):
            comp.authors_budget(setting)
    else:
        assert comp.authors_budget(setting) == expected


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.667, 0.778, 0.889, 0.95, 0.999])
@pytest.mark.parametrize("n", [576, 2880])
def test_authors_budget_from_reduction_ratio_is_their_arithmetic(ratio, n):
    expected = authors_kept_count(n, 4, 4, reduction_ratio=ratio)
    if expected > n:  # ratio 0: 4 + 8 * (n // 8) > n; their topk fails there too
        with pytest.raises(ValueError, match=f"more than the n={n}"):
            tc.create("dart-llm").authors_budget(reduction_ratio=ratio, n=n)
    else:
        assert tc.create("dart-llm").authors_budget(reduction_ratio=ratio, n=n) == expected


def test_authors_budget_named_settings_and_errors():
    comp = tc.create("dart-llm")
    assert [comp.authors_budget(m) for m in (128, 64, 32)] == [132, 68, 36]
    assert comp.authors_budget(reduction_ratio=0.778) == 4 + 8 * 15  # 576 * 0.222 = 127.9 -> 15 each
    with pytest.raises(ValueError, match="exactly one of"):
        comp.authors_budget()
    with pytest.raises(ValueError, match="exactly one of"):
        comp.authors_budget(128, reduction_ratio=0.5)
    with pytest.raises(ValueError, match="integer >= 0"):
        comp.authors_budget(-1)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        comp.authors_budget(reduction_ratio=1.0)
    with pytest.raises(ValueError, match="n, the number"):
        comp.authors_budget(128, n=0)
