"""The in-model view: mini-llava answering scenes questions under each strategy (tokencomp.analysis.vqa).

The arithmetic is checked by hand; the answering paths on the real mini-llava (skipped, saying why, when its
pretrained parts cannot be obtained): the shared image prefix gives the replies ``generate`` gives, and a
pure selection at budget = N gives exactly the uncompressed replies.
"""

from __future__ import annotations

import math

import pytest
import torch

import tokencomp as tc
from tokencomp.analysis import scenes
from tokencomp.analysis.vqa import VQABench, by_cell, by_type, relative_ci, run_vqa, shares_prefix
from tokencomp.errors import WeightsUnavailableError


def _question(qtype: str, cells: tuple[int, ...]) -> scenes.Question:
    return scenes.Question(text="?", answer="x", type=qtype, cells=cells, template=f"{qtype}/t")


def test_relative_accuracy_and_its_bootstrap_ci():
    hits = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    ref = torch.tensor([1, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    ratio, ci = relative_ci(hits, ref)
    assert ratio == pytest.approx(6 / 6)  # 6 right of 8 against 6 right of 8
    assert 0 < ci < 1
    assert relative_ci(hits, ref, seed=0) == (ratio, ci)  # seeded
    same = relative_ci(ref, ref)
    assert same[0] == 1.0 and same[1] < ci  # identical answers: only resampling noise of a ratio of 1
    assert all(math.isnan(v) for v in relative_ci(hits, torch.zeros(8, dtype=torch.bool)))


def test_accuracy_by_type_and_by_cell_by_hand():
    questions = [
        _question("count", (0, 1, 4)),
        _question("colour", (4,)),
        _question("existence", ()),
        _question("colour", (8,)),
    ]
    hits = torch.tensor([1.0, 0.0, 1.0, 1.0])
    ref = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert by_type(questions, hits, ref) == {
        "count": {"accuracy": 1.0, "accuracy_uncompressed": 1.0, "n": 1},
        "colour": {"accuracy": 0.5, "accuracy_uncompressed": 1.0, "n": 2},
        "existence": {"accuracy": 1.0, "accuracy_uncompressed": 0.0, "n": 1},
    }
    cells = by_cell(questions, hits, ref)
    assert cells["n"] == [1, 1, 0, 0, 2, 0, 0, 0, 1]
    assert cells["accuracy"][4] == 0.5 and cells["accuracy_uncompressed"][4] == 1.0
    assert cells["accuracy"][0] == 1.0 and cells["accuracy"][8] == 1.0
    assert math.isnan(cells["accuracy"][2]) and math.isnan(cells["accuracy_uncompressed"][7])


def test_which_strategies_share_the_image_prefix():
    assert shares_prefix(None) and shares_prefix(tc.create("apet")) and shares_prefix(tc.create("visionzip"))
    assert not shares_prefix(tc.create("cdpruner"))  # reads the question
    assert not shares_prefix(tc.create("fastv")) and not shares_prefix(tc.create("apet-llm"))  # inside the LLM


@pytest.fixture(scope="module")
def bench():
    from tokencomp.analysis.mini_llava.trained import load_trained_mini_llava

    try:
        model, processor = load_trained_mini_llava()
    except WeightsUnavailableError as error:
        pytest.skip(f"the pretrained parts cannot be obtained here: {error}")
    pairs = scenes.dataset("test", 7, image_size=224)  # two scenes: 5 questions and 2
    return VQABench(model, processor, pairs, per_question_n=3)


def test_shared_prefix_replies_are_generates_replies(bench):
    from tokencomp.analysis.mini_llava.answers import answer

    assert [answer(bench.model, bench.processor, s, q) for s, q in bench.pairs] == bench.full.replies
    apet = tc.create("apet")
    shared = bench._answers(apet, 64, len(bench.pairs), fallback=False)
    whole = [bench._whole(apet, 64, i, fallback=False) for i in range(len(bench.pairs))]
    assert shared.replies == [reply for reply, _, _ in whole]
    assert all(torch.equal(k, w[2]) for k, w in zip(shared.kept, whole))  # the same kept tokens
    torch.testing.assert_close(shared.first, torch.stack([first for _, first, _ in whole]), atol=2e-4, rtol=0)


def test_pure_selection_at_budget_n_answers_exactly_as_uncompressed(bench):
    rows = run_vqa(bench, [("random", {"seed": 0}), ("fastv", {})], [256])
    shared, inside = rows
    assert shared["replies"] == bench.full.replies and shared["n_questions"] == 7 and shared["kept"] == 256
    assert inside["replies"] == bench.full.replies[:3] and inside["n_questions"] == 3
    for row in rows:
        assert row["next_token_agreement"] == 1.0 and row["logit_kl"] < 1e-6
        assert row["accuracy"] == row["accuracy_uncompressed"]
        if row["accuracy_uncompressed"] > 0:
            assert row["relative_accuracy"] == 1.0
    assert shared["flash_compatible"] is True and inside["flash_compatible"] is False
    assert inside["eager_ms"] > 0 and "decoder layer" in next(iter(inside["eager_cost"]))


def test_a_row_s_accuracy_is_its_replies_against_the_answers(bench):
    from tokencomp.analysis.mini_llava.answers import normalise

    (row,) = run_vqa(bench, [("pooling", {})], [64])
    hits = [normalise(r) == q.answer for r, (_, q) in zip(row["replies"], bench.pairs)]
    reference = [normalise(r) == q.answer for r, (_, q) in zip(bench.full.replies, bench.pairs)]
    assert row["accuracy"] == pytest.approx(sum(hits) / 7) and row["per_image"]["accuracy"] == [float(h) for h in hits]
    assert row["accuracy_uncompressed"] == pytest.approx(sum(reference) / 7)
    assert row["kept"] == 64 and row["grid"] == [16, 16] and len(row["heatmap"]) == 256
    assert sum(v["n"] for v in row["accuracy_by_type"].values()) == 7
    assert row["prefill_ratio"] == pytest.approx(row["prefill_ms"] / row["prefill_ms_uncompressed"])
