"""SparseVLM: fidelity to the authors' procedure, their schedule, hand-worked examples, parameters."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from reference_sparsevlm import (
    clusters_of,
    literal_clusters_after_keep,
    literal_keep,
    literal_prefill,
    literal_raters_embeddings,
    literal_sparsevlm_layer,
    literal_split,
    raters_attention,
)
from tokencomp.strategies.sparsevlm import AUTHORS_KEEP
from tokencomp.testing import check_compressor


def tokens(b, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 6, d, generator=g) * 3
    which = torch.randint(6, (b, n), generator=g)
    return torch.gather(centres, 1, which.unsqueeze(-1).expand(-1, -1, d)) + torch.randn(b, n, d, generator=g)


def cross_attention(b, t, n, seed):
    """Head-averaged attention rows of T text tokens: softmax over the N visual and 20 other keys."""
    g = torch.Generator().manual_seed(1000 + seed)
    logits = torch.randn(b, t, n + 20, generator=g) * 1.5 + torch.randn(b, t, 1, generator=g)
    return logits.softmax(dim=-1)[:, :, :n]


def literal(x, a, k, *, raters, text=None, recycle=True, ratio=0.3, divisor=10):
    n = x.shape[0]
    keep = literal_split(n, k, ratio, divisor) if recycle else k
    idx = raters_attention(a) if raters == "attention" else literal_raters_embeddings(x, text)
    return idx, literal_sparsevlm_layer(x, a, idx, keep, recycle, ratio, divisor)


def assert_literal(result, x, a, k, **kw):
    for b in range(x.shape[0]):
        idx, (positions, values, assignment) = literal(x[b], a[b], k, **kw)
        assert result.info["raters"][b].nonzero().squeeze(1).tolist() == idx
        assert result.indices[b].tolist() == positions
        assert result.assignment[b].tolist() == assignment
        torch.testing.assert_close(result.tokens[b], values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "n,d,t,k",
    [(576, 32, 12, 309), (309, 32, 12, 204), (204, 16, 9, 113), (576, 16, 7, 82), (55, 8, 5, 27), (40, 8, 6, 40)],
)
def test_attention_raters_equal_literal_authors_procedure(seed, n, d, t, k):
    x, a = tokens(2, n, d, seed), cross_attention(2, t, n, seed)
    result = tc.create("sparsevlm").compress(x, k, tc.Context(cross_attention=a))
    assert_literal(result, x, a, k, raters="attention")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [249, 55, 120])
def test_embedding_raters_equal_literal_authors_procedure(seed, k):
    n, d, t = 300 if k == 120 else 576 if k == 249 else 249, 24, 10
    x, a = tokens(2, n, d, seed), cross_attention(2, t, n, seed)
    text = torch.randn(2, t, d, generator=torch.Generator().manual_seed(seed)) * 0.5
    result = tc.create("sparsevlm").compress(x, k, tc.Context(cross_attention=a, text_embeddings=text))
    for b in range(2):
        idx = literal_raters_embeddings(x[b], text[b])
        positions, values, assignment = literal_sparsevlm_layer(x[b], a[b], idx, literal_split(n, k))
        assert result.info["raters"][b].nonzero().squeeze(1).tolist() == idx
        assert result.indices[b].tolist() == positions
        assert result.assignment[b].tolist() == assignment
        torch.testing.assert_close(result.tokens[b], values, rtol=1e-5, atol=1e-5)
    # image_embeddings take the tokens' place in the rater rule
    img = tokens(2, n, d, seed + 50)
    other = tc.create("sparsevlm", raters="embeddings").compress(
        x, k, tc.Context(cross_attention=a, text_embeddings=text, image_embeddings=img)
    )
    for b in range(2):
        assert other.info["raters"][b].nonzero().squeeze(1).tolist() == literal_raters_embeddings(img[b], text[b])


@pytest.mark.parametrize(
    "params,n,k",
    [
        ({"recycle": False}, 100, 30),
        ({"recycle_ratio": 1.0, "cluster_divisor": 2}, 100, 60),
        ({"recycle_ratio": 0.6, "cluster_divisor": 3}, 120, 50),
        ({"recycle_ratio": 0.0, "cluster_divisor": 1}, 80, 20),
        ({}, 100, None),  # the smallest budget: keep none, recycle int(0.3 * 100) + 1 = 31 into 4 clusters
    ],
)
@pytest.mark.parametrize("seed", range(2))
def test_variants_equal_literal(params, n, k, seed):
    comp = tc.create("sparsevlm", raters="attention", **params)
    x, a = tokens(2, n, 12, seed), cross_attention(2, 6, n, seed)
    if k is None:
        k = clusters_of(n)
        assert (k, comp.split(n, k)) == (4, (0, 4))
    result = comp.compress(x, k, tc.Context(cross_attention=a))
    lit = dict(
        recycle=params.get("recycle", True),
        ratio=params.get("recycle_ratio", 0.3),
        divisor=params.get("cluster_divisor", 10),
    )
    assert_literal(result, x, a, k, raters="attention", **lit)


def test_authors_schedule_and_split():
    comp = tc.create("sparsevlm")
    assert comp.layers == [3, 7, 16]  # the authors' pruning_loc [2, 6, 15], one later in our convention
    expected = {192: [309, 204, 113], 128: [312, 117, 39], 96: [249, 55, 27], 64: [82, 32, 18]}
    for retained, budgets in expected.items():
        assert tc.create("sparsevlm", retained=retained).stage_budgets(576) == budgets
        n = 576
        for count, k in zip(AUTHORS_KEEP[retained], budgets):
            keep, c = comp.split(n, k)
            assert keep == count and keep + clusters_of(n - keep) == k and c == clusters_of(n - keep)
            n = k
    assert tc.create("sparsevlm", recycle=False).stage_budgets(576) == [300, 200, 110]
    # other N: the counts scale by N / 576 (rounded half up); explicit counts are used as given
    assert comp.stage_counts(2880) == [1500, 1000, 550]
    assert comp.stage_counts(288, 64) == [33, 15, 9]  # 66, 30, 17 halved; 8.5 rounds up
    # 400 -> keep 100, P = 300, r = 91, c = 10 -> 110 -> keep 50, P = 60, r = 19, c = 2 -> 52
    # -> keep 20, P = 32, r = 10, c = 2 -> 22
    assert tc.create("sparsevlm", keep_counts=[100, 50, 20]).stage_budgets(400) == [110, 52, 22]
    assert tc.create("sparsevlm", layers=[2, 4], keep_counts=[10, 5], recycle=False).stage_budgets(8) == [7, 5]


def test_three_stages_from_576_tokens():
    comp = tc.create("sparsevlm")
    x = tokens(1, 576, 16, 7)
    merged_expected = [9, 4, 3]
    for s, k in enumerate(comp.stage_budgets(576)):
        a = cross_attention(1, 8, x.shape[1], 20 + s)
        result = comp.compress(x, k, tc.Context(cross_attention=a, layer=comp.layers[s]))
        assert result.kept == k and int(result.info["recycled"].sum()) == merged_expected[s]
        recycled_inputs = int((result.assignment >= 0).sum()) - k + merged_expected[s]  # members of clusters
        n = x.shape[1]
        keep = k - merged_expected[s]
        assert recycled_inputs == min(n - keep, int((n - keep) * 0.3) + 1)
        x = result.tokens


def test_explicit_counts_give_the_authors_keep_and_clusters_at_n_576():
    # The authors' pair for a count at N visual tokens (Gumpest/SparseVLMs, main 26a5f48):
    #   keep = min(count, N - 1)                         score.py l.41 (torch.topk(relation_vis, min(...)))
    #   P = N - keep; r = int(P * 0.3) + 1               modelling_sparse_llama.py l.282 (merge_token_num_stage1)
    #   clusters = int(r / 10) + 1                       modelling_sparse_llama.py l.286 (cluster_num)
    # The output count keep + clusters does not tell them apart where clusters drops by one (46 + 17 =
    # 47 + 16 = 63 at N = 576): the stage's count must. Every count 1..575; through compress at that layer
    # for each count where K alone is ambiguous (18 of them) and a few others.
    n, x = 576, tokens(1, 576, 4, 3)
    a = cross_attention(1, 3, n, 3)
    ambiguous = []
    for count in range(1, n):
        comp = tc.create("sparsevlm", layers=[5], keep_counts=[count])
        (k,) = comp.stage_budgets(n)
        authors = (literal_keep(n, count), literal_clusters_after_keep(n, count))
        assert comp.split(n, k, comp.stage_count(n, tc.Context(layer=5))) == authors, count
        if comp.split(n, k) != authors:
            ambiguous.append(count)
    assert ambiguous == [12, 46, 79, 112, 146, 179, 212, 246, 279, 312, 346, 379, 412, 446, 479, 512, 546, 575]
    for count in ambiguous + [1, 300, 574]:
        comp = tc.create("sparsevlm", layers=[5], keep_counts=[count], raters="attention")
        (k,) = comp.stage_budgets(n)
        result = comp.compress(x, k, tc.Context(cross_attention=a, layer=5))
        clusters = int(result.info["recycled"].sum())
        assert (k - clusters, clusters) == (literal_keep(n, count), literal_clusters_after_keep(n, count)), count
    # e.g. the brief's case: keep_counts=[46, 30, 17] keeps 46 and merges 17 at the first layer
    comp = tc.create("sparsevlm", keep_counts=[46, 30, 17])
    assert comp.split(576, 63, comp.stage_count(576, tc.Context(layer=3))) == (46, 17)
    assert comp.split(576, 63) == (47, 16)  # K alone: the largest keep


@pytest.mark.parametrize("n", [37, 62, 133, 300, 1000])
def test_explicit_counts_give_the_authors_pair_at_other_n(n):
    for count in range(1, n + 3):
        comp = tc.create("sparsevlm", layers=[2, 9], keep_counts=[count, max(1, count // 3)])
        m = n
        for layer, c_s, k in zip(comp.layers, comp.keep_counts, comp.stage_budgets(n)):
            pair = comp.split(m, k, comp.stage_count(m, tc.Context(layer=layer)))
            assert pair == (literal_keep(m, c_s), literal_clusters_after_keep(m, c_s)), (n, count, layer)
            m = k


@pytest.mark.parametrize("retained", sorted(AUTHORS_KEEP))
def test_the_scaled_table_gives_the_authors_pair_with_schedule_n(retained):
    # For N != 576 the table is scaled from the tokens entering the first stage (Context.schedule_n,
    # which the in-LLM integration sets); with it every stage gets the authors' pair.
    comp = tc.create("sparsevlm", retained=retained)
    for n0 in range(40, 1200, 7):
        m = n0
        for layer, count, k in zip(comp.layers, comp.stage_counts(n0), comp.stage_budgets(n0)):
            pair = comp.split(m, k, comp.stage_count(m, tc.Context(layer=layer, schedule_n=n0)))
            assert pair == (literal_keep(m, count), literal_clusters_after_keep(m, count)), (n0, layer)
            m = k
    # at the first stage the entering tokens are the schedule's n: no schedule_n needed
    assert comp.stage_count(62, tc.Context(layer=3)) == comp.stage_counts(62)[0]
    assert comp.stage_count(62, tc.Context(layer=7)) is None and comp.stage_count(62, tc.Context(layer=4)) is None


def three_stages(b, seed, per_layer=False, carry=True):
    """Our three stages chained by hand (as the integration does): each gets the previous stage's raters."""
    comp = tc.create(
        "sparsevlm", layers=[1, 2, 3], keep_counts=[60, 30, 12], raters="attention", raters_per_layer=per_layer
    )
    x, results, inputs, raters = tokens(b, 120, 8, seed), [], [], None
    for s, k in enumerate(comp.stage_budgets(120)):
        a = cross_attention(b, 7, x.shape[1], seed * 10 + s)
        inputs.append((x, a))
        results.append(comp.compress(x, k, tc.Context(cross_attention=a, layer=comp.layers[s], raters=raters)))
        raters = results[-1].info["raters"] if carry else None
        x = results[-1].tokens + 0.1 * tokens(b, k, 8, seed + 100 + s)  # the layers in between move the tokens
    return comp, inputs, results


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_raters_chosen_once_and_reused_as_the_authors(seed, per_layer):
    comp, inputs, results = three_stages(2, seed, per_layer)
    changed = False
    for b in range(2):
        stages = [(x[b], a[b]) for x, a in inputs]
        literal = literal_prefill(stages, comp.keep_counts, lambda x, a: raters_attention(a), per_layer=per_layer)
        for (idx, positions, values, assignment), result in zip(literal, results):
            assert result.info["raters"][b].nonzero().squeeze(1).tolist() == idx
            assert result.indices[b].tolist() == positions
            assert result.assignment[b].tolist() == assignment
            torch.testing.assert_close(result.tokens[b], values, rtol=1e-5, atol=1e-5)
        firsts = [idx for idx, *_ in literal]
        assert per_layer or all(idx == firsts[0] for idx in firsts)
        changed |= any(raters_attention(a) != firsts[0] for _, a in stages[1:])
    assert changed  # the per-layer rule would pick other raters: the reuse is tested, not a coincidence


def test_raters_without_carry_are_chosen_at_each_call():
    # The direct API without Context.raters: every call is a first stage.
    _, inputs, results = three_stages(1, 0, carry=False)
    for (_, a), result in zip(inputs, results):
        assert result.info["raters"][0].nonzero().squeeze(1).tolist() == raters_attention(a[0])


def test_given_raters_errors():
    x, a = tokens(1, 20, 4, 0), cross_attention(1, 3, 20, 0)
    comp = tc.create("sparsevlm")
    with pytest.raises(ValueError, match=r"raters must be a bool tensor \[B, T\] over the T=3 .* torch.bool \(1, 4\)"):
        comp.compress(x, 5, tc.Context(cross_attention=a, raters=torch.ones(1, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"context.raters must be a bool tensor .* got torch.float32"):
        comp.compress(x, 5, tc.Context(cross_attention=a, raters=torch.ones(1, 3)))
    with pytest.raises(ValueError, match="context.raters has a row without any rater"):
        comp.compress(x, 5, tc.Context(cross_attention=a, raters=torch.zeros(1, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"context.raters must have shape \[B, T\] = \[1, T\]"):
        comp.compress(x, 5, tc.Context(cross_attention=a, raters=torch.ones(2, 3, dtype=torch.bool)))
    # per layer: a given one is ignored
    ignored = tc.create("sparsevlm", raters_per_layer=True).compress(
        x, 5, tc.Context(cross_attention=a, raters=torch.zeros(1, 3, dtype=torch.bool))
    )
    assert ignored.info["raters"][0].nonzero().squeeze(1).tolist() == raters_attention(a[0])


def hand_example():
    # 8 visual tokens in 2-D; T = 2 text rows. Attention raters: the columns normalised over the text
    # rows average to m = (0.856, 0.144) > mean 0.5 only for row 0, so the scores are row 0:
    # ranking 0 (.20), 3 (.15), 1 (.10), 5 (.08), 6 (.06), 2 (.05), 7 (.04), 4 (.02).
    x = torch.tensor(
        [[9.0, 9.0], [-9.0, 9.0], [2.0, 0.0], [9.0, -9.0], [10.0, 2.0], [0.0, 0.0], [0.0, 2.0], [10.0, 0.0]]
    )
    a = torch.tensor([[0.20, 0.10, 0.05, 0.15, 0.02, 0.08, 0.06, 0.04], [0.01] * 8])
    return x, a


def test_hand_worked_default_recycling():
    # K = 4 of N = 8: keep + c(8 - keep) = 4 -> keep 3 (positions 0, 1, 3), P = 5 pruned,
    # r = int(1.5) + 1 = 2 recycled (positions 5, 6, the best pruned), c = int(2 / 10) + 1 = 1 cluster:
    # the mean (0, 1), at its centre. DPC with 1 neighbour: both densities exp(0) = 1 (tie: position 5,
    # the higher score, is the denser), both deltas = dist_max -> equal rho * delta, centre = position 5.
    x, a = hand_example()
    result = tc.create("sparsevlm").compress(x, 4, tc.Context(cross_attention=a))
    assert result.info["raters"].tolist() == [True, False]
    assert result.indices.tolist() == [0, 1, 3, 5]
    torch.testing.assert_close(result.tokens, torch.tensor([[9.0, 9.0], [-9.0, 9.0], [9.0, -9.0], [0.0, 1.0]]))
    assert result.assignment.tolist() == [0, 1, -1, 2, -1, 3, 3, -1]
    assert result.info["recycled"].tolist() == [False, False, False, True]
    torch.testing.assert_close(result.info["scores"], a[0])
    # no recycling: the top 3, the rest dropped
    plain = tc.create("sparsevlm", recycle=False).compress(x, 3, tc.Context(cross_attention=a))
    assert plain.indices.tolist() == [0, 1, 3]
    assert plain.assignment.tolist() == [0, 1, -1, 2, -1, -1, -1, -1]


def test_hand_worked_density_peak_clustering():
    # recycle_ratio=1, cluster_divisor=2, K = 6: keep 3 (0, 1, 3), all P = 5 pruned recycled, in score order
    # a0..a4 = positions 5 (0,0), 6 (0,2), 2 (2,0), 7 (10,0), 4 (10,2); c = 5 // 2 + 1 = 3 clusters.
    # d = euclid / sqrt(2); density over the 3 nearest (itself included), rho = exp(-mean d^2):
    # a0: d^2 = 0, 2, 2 -> e^(-4/3); a1 and a2: 0, 2, 4 -> e^(-2) (tie: a1 is the denser); a3: 0, 2, 32;
    # a4: 0, 2, 34. delta: a0 (densest) dist_max = sqrt(104 / 2); a1: to a0 = sqrt(2); a2: to a0 = sqrt(2);
    # a3: to a2 = sqrt(32); a4: to a3 = sqrt(2). rho * delta: a0 1.90, a1 = a2 0.19, a3 7e-5, a4 9e-6
    # -> centres a0, a1, a2 (a1 before a2 on the tie); a3 and a4 are nearest to a2.
    # Merged: (0, 0) at 5, (0, 2) at 6, mean of (2,0), (10,0), (10,2) = (22/3, 2/3) at 2.
    x, a = hand_example()
    comp = tc.create("sparsevlm", recycle_ratio=1.0, cluster_divisor=2)
    assert comp.split(8, 6) == (3, 3)
    result = comp.compress(x, 6, tc.Context(cross_attention=a))
    assert result.indices.tolist() == [0, 1, 2, 3, 5, 6]
    expected = torch.tensor([[9.0, 9.0], [-9.0, 9.0], [22 / 3, 2 / 3], [9.0, -9.0], [0.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(result.tokens, expected)
    assert result.assignment.tolist() == [0, 1, 2, 3, 2, 4, 5, 2]
    assert result.info["recycled"].tolist() == [False, False, True, False, True, True]


def test_hand_worked_raters_auto():
    # Row 1 now attends uniformly and strongly: by attention, row 1 is the only rater (uniform scores,
    # ties to the lower positions: keep 0, 1, 2; recycle 3, 4 into their mean at 3).
    # With text embeddings (1, 0) and (-1, 0), the embedding rule picks row 0 as before.
    x, _ = hand_example()
    a = torch.tensor([[0.20, 0.10, 0.05, 0.15, 0.02, 0.08, 0.06, 0.04], [0.3] * 8])
    by_attention = tc.create("sparsevlm").compress(x, 4, tc.Context(cross_attention=a))
    assert by_attention.info["raters"].tolist() == [False, True]
    assert by_attention.indices.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(by_attention.tokens[3], torch.tensor([9.5, -3.5]))
    assert by_attention.assignment.tolist() == [0, 1, 2, 3, 3, -1, -1, -1]
    text = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    by_text = tc.create("sparsevlm").compress(x, 4, tc.Context(cross_attention=a, text_embeddings=text))
    assert by_text.info["raters"].tolist() == [True, False]
    assert by_text.indices.tolist() == [0, 1, 3, 5]
    forced = tc.create("sparsevlm", raters="attention").compress(
        x, 4, tc.Context(cross_attention=a, text_embeddings=text)
    )
    assert forced.info["raters"].tolist() == [False, True]


def test_single_text_token_rates_alone():
    # T = 1: m = (1.0) is not above its mean; the authors' mean over no rows would be NaN, ours uses it.
    x, a = hand_example()
    result = tc.create("sparsevlm").compress(x, 4, tc.Context(cross_attention=a[:1]))
    assert result.info["raters"].tolist() == [True]
    assert result.indices.tolist() == [0, 1, 3, 5]


def test_rater_rank_reported():
    x, a = tokens(2, 50, 8, 0), cross_attention(2, 6, 50, 0)
    result = tc.create("sparsevlm").compress(x, 20, tc.Context(cross_attention=a))
    for b in range(2):
        rows = a[b][result.info["raters"][b]]
        assert int(result.info["rater_rank"][b]) == int(torch.linalg.matrix_rank(rows)) == rows.shape[0]


def test_keep_all():
    x, a = tokens(2, 30, 8, 1), cross_attention(2, 4, 30, 1)
    result = tc.create("sparsevlm").compress(x, 30, tc.Context(cross_attention=a))
    assert torch.equal(result.tokens, x) and not bool(result.info["recycled"].any())


def test_budget_below_the_recycling_minimum_raises():
    x, a = tokens(1, 100, 8, 0), cross_attention(1, 4, 100, 0)
    assert clusters_of(100) == 4
    with pytest.raises(ValueError, match=r"sparsevlm: budget K=3 is below the minimum 4 for N=100 .* recycle=False"):
        tc.create("sparsevlm").compress(x, 3, tc.Context(cross_attention=a))
    assert tc.create("sparsevlm").compress(x, 4, tc.Context(cross_attention=a)).kept == 4
    assert tc.create("sparsevlm", recycle=False).compress(x, 1, tc.Context(cross_attention=a)).kept == 1


def test_context_errors():
    x, a = tokens(1, 20, 4, 0), cross_attention(1, 3, 20, 0)
    with pytest.raises(ValueError, match="sparsevlm: needs context.cross_attention"):
        tc.create("sparsevlm").compress(x, 5)
    with pytest.raises(ValueError, match=r"raters='embeddings' needs context.text_embeddings"):
        tc.create("sparsevlm", raters="embeddings").compress(x, 5, tc.Context(cross_attention=a))
    with pytest.raises(ValueError, match=r"text_embeddings must be \[B, T, D\] with the T=3"):
        tc.create("sparsevlm").compress(x, 5, tc.Context(cross_attention=a, text_embeddings=torch.randn(1, 4, 4)))
    bad = a.clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="sparsevlm: context.cross_attention contains NaN"):
        tc.create("sparsevlm").compress(x, 5, tc.Context(cross_attention=bad))


@pytest.mark.parametrize(
    "params,fragment",
    [
        (
            {"layers": [3, 3, 16]},
            "'layers' must be a non-empty, strictly increasing list of integers in [1, inf]; got [3, 3, 16].",
        ),
        ({"layers": 3}, "'layers' must be a non-empty, strictly increasing list of integers in [1, inf]; got 3."),
        (
            {"layers": [0, 7, 16]},
            "'layers' must be a non-empty, strictly increasing list of integers in [1, inf]; got [0, 7, 16].",
        ),
        ({"layers": [3, 7]}, "'layers' has 2 entries"),
        ({"retained": 100}, "'retained' must be one of 192, 128, 96, 64; got 100. These are the authors' settings"),
        (
            {"keep_counts": [10, 0, 5]},
            "'keep_counts' must be None or a non-empty list of integers in [1, inf]; got [10, 0, 5].",
        ),
        ({"keep_counts": [10, 5]}, "keep_counts has 2 per-layer counts"),
        ({"recycle": 1}, "'recycle' must be True or False"),
        ({"recycle_ratio": 1.5}, "'recycle_ratio' must be a finite number in [0.0, 1.0]"),
        ({"cluster_divisor": 0}, "'cluster_divisor' must be an integer in [1, inf]"),
        ({"raters": "text"}, "'raters' must be one of 'auto', 'attention', 'embeddings'"),
        ({"raters_per_layer": "yes"}, "'raters_per_layer' must be True or False"),
    ],
)
def test_bad_parameters_raise_on_construction(params, fragment):
    with pytest.raises(tc.InvalidParameterError) as err:
        tc.create("sparsevlm", **params)
    assert fragment in str(err.value)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match=r"final_k must be one of \[192, 128, 96, 64\]"):
        tc.create("sparsevlm").stage_counts(576, 100)
    with pytest.raises(ValueError, match="explicit keep_counts"):
        tc.create("sparsevlm", keep_counts=[1, 2, 3]).stage_counts(576, 192)


@pytest.mark.parametrize(
    "params",
    [
        {"recycle": False},
        {"raters": "attention", "recycle_ratio": 1.0, "cluster_divisor": 2},
        {"keep_counts": [40, 20, 10]},
    ],
)
def test_variants_conform(params):
    check_compressor(tc.create("sparsevlm", **params))


def duplicated_tokens(b, n, d, seed):
    """Two thirds of the tokens are copies of two tokens (positions 0 and 1)."""
    x = tokens(b, n, d, seed)
    x[:, 0::3] = x[:, 0:1]
    x[:, 1::3] = x[:, 1:2]
    return x


@pytest.mark.parametrize("d", [64, 256])
def test_duplicate_tokens_tie_as_in_the_literal_procedure(d):
    # Copies are at distance exactly 0, so their densities and their (zero) rho * delta tie, and the tie
    # rules decide, as in the float64 reference. With half of the recycled tokens as centres, the zero-score
    # copies become centres in position order; distances off by rounding (a float64 Gram form without the
    # zero snap, ~1e-8 here) would order them by that noise instead.
    x, a = duplicated_tokens(2, 90, d, 0), cross_attention(2, 5, 90, 0)
    comp = tc.create("sparsevlm", raters="attention", recycle_ratio=1.0, cluster_divisor=2)
    result = comp.compress(x, 50, tc.Context(cross_attention=a))
    assert_literal(result, x, a, 50, raters="attention", ratio=1.0, divisor=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_blocked_distances_equal_one_block(monkeypatch, dtype):
    # The clustering's three passes over the pairwise distances run in blocks of rows: tiny blocks (a few
    # rows each, so the delta pass's denser prefix cuts across blocks) give the same result as one block.
    import tokencomp.kernels.blocks as blocks

    x, a = duplicated_tokens(2, 150, 16, 1).to(dtype), cross_attention(2, 6, 150, 1)
    x[:, 2::5] = tokens(2, 30, 16, 2).to(dtype)  # fewer copies: more distinct densities
    comp, ctx = tc.create("sparsevlm", recycle_ratio=0.8, cluster_divisor=4), tc.Context(cross_attention=a)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1 << 30)
    whole = comp.compress(x, 60, ctx)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 2 * 2 * 3 * 100)  # 3 rows of ~100 distances a block
    small = comp.compress(x, 60, ctx)
    assert torch.equal(whole.indices, small.indices) and torch.equal(whole.assignment, small.assignment)
    torch.testing.assert_close(whole.tokens, small.tokens)


def test_peak_memory_is_bounded(monkeypatch):
    # 2304 tokens (four frames), K = 288, every pruned token recycled: ~2070 tokens clustered. Their
    # [r, r] distances are never held whole: with blocks of 512 Ki elements the peak stays below half an
    # [r, r] float32 matrix (the previous kernel held the distances, a mask and a masked copy: 2.3 of them).
    import tokencomp.kernels.blocks as blocks
    from tokencomp.analysis.measure import peak_memory
    from tokencomp.strategies.sparsevlm import recycled_count

    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1 << 19)
    n = 2304
    x, a = tokens(1, n, 64, 0), cross_attention(1, 6, n, 0)
    comp, ctx = tc.create("sparsevlm", recycle_ratio=1.0, cluster_divisor=40), tc.Context(cross_attention=a)
    keep, _ = comp.split(n, 288)
    r = recycled_count(n - keep, 1.0)
    assert r > 2000
    _, peak = peak_memory(lambda: comp.compress(x, 288, ctx))
    assert peak < r * r * 4 / 2


def test_clusters_of_huge_tokens_are_nearest_centre_clusters():
    """Tokens of size ~1e30: the float32 distance tolerance must not overflow (every distance counted as 0
    would hand every token to the first centre). Each token goes to its nearest centre, as in float64."""
    from tokencomp.strategies.sparsevlm import _dpc_knn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 8, generator=g) * 2.0**100
    centres, owner = _dpc_knn(x, 4)
    xd = x.double()
    nearest = torch.cdist(xd, torch.gather(xd, 1, centres.unsqueeze(-1).expand(-1, -1, 8))).argmin(dim=-1)
    assert torch.equal(owner, nearest)
    assert owner.unique().numel() == 4
