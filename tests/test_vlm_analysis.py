"""Measurements inside a VLM: agreement, composed kept positions, measured FlashAttention compatibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tokencomp as tc
from tokencomp.analysis.data import bundled_images
from tokencomp.analysis.measure import peak_memory
from tokencomp.analysis.tiny_vlm import tiny_llava
from tokencomp.analysis.vlm import (
    AttentionShape,
    attention_cost,
    budget_runs,
    llava_inputs,
    record_kept,
    run_vlm,
    shuffle_patches,
)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(image_size=84, layers=4)  # 6 x 6 = 36 visual tokens


@pytest.fixture(scope="module")
def images():
    return [img for _, img in bundled_images(["astronaut", "coffee", "chelsea"])]


def test_shuffle_patches_moves_whole_patches():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    out = shuffle_patches(x, 2, torch.Generator().manual_seed(0))

    def patches(t):
        return t.reshape(2, 3, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 4, -1)

    before, after = patches(x), patches(out)
    for b in range(2):  # every output patch is one input patch of the same image, each used once
        match = (after[b][:, None] == before[b][None]).all(-1)
        assert match.sum(1).tolist() == [1] * 4 and match.sum(0).tolist() == [1] * 4
    assert not torch.equal(out, x)
    with pytest.raises(ValueError, match="not a multiple of patch"):
        shuffle_patches(torch.zeros(1, 3, 5, 5), 2, torch.Generator())


def test_record_kept_composes_stages_and_restores_the_method():
    comp = tc.create("random", seed=0)
    tokens = torch.randn(2, 10, 4)
    with record_kept([comp]) as log:
        first = comp.compress(tokens, 6)
        second = comp.compress(first.tokens, 3)
    expected = first.indices.gather(1, second.indices)
    assert torch.equal(log.positions, expected) and log.calls == 2
    assert "compress" not in vars(comp)  # the class's method is back


def test_peak_memory_sees_an_allocation():
    _, peak = peak_memory(lambda: torch.ones(1_000_000))
    assert 4_000_000 <= peak < 4_100_000


def test_attention_cost_eager_materialises_the_weights():
    shape = AttentionShape("t", heads=4, head_dim=16, length=256)
    cost = attention_cost(shape, repeats=1)
    weights = 4 * 256 * 256 * 4  # [H, L, L] float32
    assert cost["eager_peak_mib"] * 2**20 >= weights
    assert cost["sdpa_peak_mib"] * 2**20 < weights
    assert cost["eager_ms"] > 0 and cost["sdpa_ms"] > 0


def test_budget_runs():
    assert budget_runs("apet", {}, [64, 128]) == [({}, 64, 64, ""), ({}, 128, 128, "")]
    assert budget_runs("pdrop", {}, [64, 128]) == [({}, None, None, "")]  # its own ratio schedule
    runs = budget_runs("sparsevlm", {}, [64, 100])
    assert runs[0] == ({"retained": 64}, None, 64, "")
    assert runs[1][:3] == ({"retained": 100}, None, 100) and "retained" in runs[1][3]


def test_llava_inputs_rows(model, images):
    inputs = llava_inputs(model, images)
    ids = inputs["input_ids"]
    assert ids.shape[0] == 3 and (ids == model.config.image_token_id).sum(1).tolist() == [36] * 3
    assert torch.equal(ids[0], ids[2]) and inputs["pixel_values"].shape == (3, 3, 84, 84)


def test_keeping_every_token_agrees_exactly(model, images):
    (cell,) = run_vlm(model, images, [("random", {"seed": 0})], [36])
    assert cell.next_token_agreement == 1.0 and cell.logit_kl < 1e-6
    assert cell.position_bias == pytest.approx(0.0, abs=1e-12)  # every position kept: uniform
    assert cell.flash_compatible is True and cell.kept == 36
    assert cell.heatmap.tolist() == [1.0] * 36


def test_flash_compatibility_is_measured(model, images):
    cells = run_vlm(model, images, [("apet", {}), ("fastv", {}), ("visionzip", {})], [12])
    apet, fastv, visionzip = cells
    assert apet.flash_compatible is True and not apet.eager_cost
    assert fastv.flash_compatible is False and "eager" in fastv.flash_error
    assert visionzip.flash_compatible is False and "[CLS]" in visionzip.flash_error
    # the eager layer each needs, timed against SDPA at the same length (this model and LLaVA-1.5-7B)
    assert set(fastv.eager_cost) == {"this model's decoder layer", "LLaVA-1.5-7B decoder layer"}
    assert set(visionzip.eager_cost) == {"this model's vision tower", "LLaVA-1.5-7B vision tower"}
    assert fastv.eager_cost["this model's decoder layer"]["length"] == llava_inputs(model, images)["input_ids"].shape[1]
    for cost in (*fastv.eager_cost.values(), *visionzip.eager_cost.values()):
        assert cost["eager_peak_mib"] > cost["sdpa_peak_mib"]
    # the eager fallback still measured the strategy
    assert fastv.kept == 12 and 0 <= fastv.next_token_agreement <= 1 and not math.isnan(fastv.logit_kl)
    row = fastv.row("tiny-llava")
    assert row["flash_measured"] and row["eager_ms"] == fastv.eager_cost["LLaVA-1.5-7B decoder layer"]["eager_ms"]


def test_run_vlm_refuses_other_models(images):
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        run_vlm(torch.nn.Linear(2, 2), images, [("random", {})], [8])


def test_unsupported_budget_is_a_skipped_row(model, images):
    (cell,) = run_vlm(model, images, [("sparsevlm", {"layers": [1, 2, 3]})], [100])
    assert "retained" in cell.skipped and math.isnan(cell.next_token_agreement)


def test_fastv_keeps_by_position_more_than_apet():
    """The known bias: FastV's last-token attention prefers some places whatever the content; ApET's
    choice follows the content. At LLaVA-1.5's 576 tokens (seeds 0-2 gave FastV 0.10-0.19, ApET
    0.010-0.027, random 0.007)."""
    model = tiny_llava(image_size=336, layers=4)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (336, 336, 3), dtype=np.uint8) for _ in range(8)]
    fastv, apet = run_vlm(model, images, [("fastv", {}), ("apet", {})], [64])
    assert fastv.position_bias > 3 * apet.position_bias
