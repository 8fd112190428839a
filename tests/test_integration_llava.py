"""tc.apply on a tiny random LLaVA-1.5: token counts, KV-cache correctness, exact restoration, context."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from tiny_models import first_layer_lengths, llava_prompt, pre_hooks, tiny_dinov2_llava, tiny_llava

N = 36  # (84 / 14)^2 patches per image


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def greedy(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, suppress_tokens=[119], **kw)


@pytest.mark.parametrize("strategy,budget", [("apet", 16), ("divprune", 9), ("pooling", 9), ("random", 0.25)])
@pytest.mark.parametrize("point", ["pre_projector", "post_projector"])
def test_first_layer_sees_the_budget(model, strategy, budget, point):
    inputs = llava_prompt(model, images=2, batch=2)
    length = inputs["input_ids"].shape[1]
    k = budget if isinstance(budget, int) else round(budget * N)
    with tc.apply(model, strategy, budget=budget, point=point) as handle:
        seen = first_layer_lengths(model, lambda: model(**inputs))
    assert seen == [length - 2 * (N - k)]
    assert handle.stats[0]["tokens_in"] == 4 * N and handle.stats[0]["tokens_out"] == 4 * k


@pytest.mark.parametrize("strategy", ["apet", "divprune", "dart", "visionzip"])
def test_generation_with_cache_equals_without(strategy):
    model = tiny_llava(attn_implementation="eager")
    inputs = llava_prompt(model, batch=2, pad=[0, 3], seed=1)
    with tc.apply(model, strategy, budget=12):
        cached = greedy(model, inputs)
        uncached = greedy(model, inputs, use_cache=False)
        lengths = first_layer_lengths(model, lambda: greedy(model, inputs))
    assert torch.equal(cached, uncached)
    assert lengths[0] == inputs["input_ids"].shape[1] - (N - 12) and set(lengths[1:]) == {1}


@pytest.mark.parametrize("strategy", ["divprune", "random", "dart"])
@pytest.mark.parametrize("point", ["pre_projector", "post_projector"])
def test_full_budget_selection_equals_uncompressed_logits(model, strategy, point):
    inputs = llava_prompt(model, images=2, batch=2, pad=[2, 0], seed=2)
    with torch.no_grad():
        reference = model(**inputs).logits
        with tc.apply(model, strategy, budget=N, point=point):
            compressed = model(**inputs).logits
    assert torch.equal(compressed, reference)


def test_remove_restores_exactly_and_guards(model):
    inputs = llava_prompt(model, batch=2, seed=3)
    with torch.no_grad():
        before = model(**inputs).logits
        handle = tc.apply(model, "apet", budget=16)
        changed = model(**inputs).logits
        with pytest.raises(RuntimeError, match="already has a compression applied"):
            tc.apply(model, "random", budget=8)
        handle.remove()
        after = model(**inputs).logits
    assert changed.shape[1] < before.shape[1]
    assert torch.equal(before, after)
    with pytest.raises(RuntimeError, match="already removed"):
        handle.remove()
    assert not model.model.language_model.layers[0]._forward_pre_hooks
    assert not model.model.multi_modal_projector._forward_pre_hooks
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks


def test_compression_changes_the_answer_and_is_image_dependent(model):
    a = llava_prompt(model, seed=4)
    b = dict(a, pixel_values=torch.randn_like(a["pixel_values"]))
    full_a, full_b = greedy(model, a), greedy(model, b)
    assert not torch.equal(full_a, full_b)  # the tiny model does look at the image
    with tc.apply(model, "apet", budget=12):
        small_a = greedy(model, a)
    assert small_a.shape == full_a.shape  # generate still returns the original prompt + new tokens
    assert torch.equal(small_a[:, : a["input_ids"].shape[1]], a["input_ids"])


def test_left_padded_batch_equals_rows_alone():
    model = tiny_llava(attn_implementation="eager")
    inputs = llava_prompt(model, batch=3, pad=[0, 2, 5], seed=5)
    with tc.apply(model, "divprune", budget=10):
        batched = greedy(model, inputs)
        for row in range(3):
            keep = inputs["attention_mask"][row].bool()
            alone = {
                "input_ids": inputs["input_ids"][row : row + 1, keep],
                "attention_mask": inputs["attention_mask"][row : row + 1, keep],
                "pixel_values": inputs["pixel_values"][row : row + 1],
            }
            single = greedy(model, alone)
            assert torch.equal(batched[row, -6:], single[0, -6:])


def test_cls_attention_under_sdpa_needs_eager(model):
    inputs = llava_prompt(model, seed=6)
    with tc.apply(model, "visionzip", budget=12):
        with pytest.raises(tc.errors.AttentionUnavailableError, match="allow_eager_fallback=True"):
            with torch.no_grad():
                model(**inputs)
    eager = tiny_llava(attn_implementation="eager")
    with torch.no_grad():
        with tc.apply(eager, "visionzip", budget=12):
            expected = eager(**inputs).logits
        with tc.apply(model, "visionzip", budget=12, allow_eager_fallback=True):
            fallback = model(**inputs).logits
    torch.testing.assert_close(fallback, expected, rtol=1e-4, atol=1e-4)
    assert model.model.vision_tower.config._attn_implementation == "sdpa"  # switched back


def test_cls_attention_is_the_layer_rows(model):
    # The [CLS] row handed to the strategy equals the eager attention of the selected layer.
    eager = tiny_llava(attn_implementation="eager")
    inputs = llava_prompt(eager, seed=7)
    captured = {}

    class Spy(tc.Compressor):
        requires = ("cls_attention",)
        needs_attention = True
        deterministic = True

        def _compress(self, tokens, k, context):
            captured["cls"] = context.cls_attention
            captured["grid"] = context.grid
            return tc.selection_result(tokens, torch.arange(k).expand(tokens.shape[0], k))

    with torch.no_grad():
        out = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True)
        with tc.apply(eager, Spy(), budget=5):
            eager(**inputs)
    expected = out.attentions[-2][:, :, 0, 1:].mean(dim=1)
    torch.testing.assert_close(captured["cls"], expected)
    assert captured["grid"] == (6, 6)


class SpyCls(tc.Compressor):
    """Keeps the first ``k`` tokens and records the context it was given."""

    requires = ("cls_attention",)
    needs_attention = True
    deterministic = True
    seen: dict = {}

    def _compress(self, tokens, k, context):
        SpyCls.seen.update(cls=context.cls_attention, grid=context.grid)
        return tc.selection_result(tokens, torch.arange(k).expand(tokens.shape[0], k))


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_dinov2_tower_cls_attention_is_the_layer_rows(feature_layer):
    # A DINOv2 tower keeps its attention at encoder.layer[i].attention (CLIP: encoder.layers[i].self_attn).
    eager = tiny_dinov2_llava(attn_implementation="eager", vision_feature_layer=feature_layer)
    inputs = llava_prompt(eager, seed=7)
    with torch.no_grad():
        out = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True)
        with tc.apply(eager, SpyCls(), budget=5):
            eager(**inputs)
    expected = out.attentions[feature_layer][:, :, 0, 1:].mean(dim=1)
    torch.testing.assert_close(SpyCls.seen["cls"], expected)
    assert SpyCls.seen["grid"] == (6, 6)


def test_dinov2_tower_visionzip_cache_and_eager_fallback():
    eager = tiny_dinov2_llava(attn_implementation="eager")
    inputs = llava_prompt(eager, batch=2, pad=[0, 3], seed=8)
    single = llava_prompt(eager, seed=9)  # no padding: eager and SDPA differ only on padded rows
    with tc.apply(eager, "visionzip", budget=12):
        cached = greedy(eager, inputs)
        uncached = greedy(eager, inputs, use_cache=False)
        with torch.no_grad():
            expected = eager(**single).logits
    assert torch.equal(cached, uncached)
    sdpa = tiny_dinov2_llava()
    with tc.apply(sdpa, "visionzip", budget=12):
        with pytest.raises(tc.errors.AttentionUnavailableError, match="allow_eager_fallback=True"):
            with torch.no_grad():
                sdpa(**single)
    with torch.no_grad(), tc.apply(sdpa, "visionzip", budget=12, allow_eager_fallback=True):
        fallback = sdpa(**single).logits
    torch.testing.assert_close(fallback, expected, rtol=1e-4, atol=1e-4)
    assert sdpa.model.vision_tower.config._attn_implementation == "sdpa"  # switched back


def test_errors(model):
    with pytest.raises(ValueError, match="decoder layers"):
        tc.apply(model, "fastv", budget=8, layer=4)
    with pytest.raises(ValueError, match="at most one pre-LLM stage"):
        tc.apply(model, [("apet", 20), ("random", 8)])
    with pytest.raises(ValueError, match="pass budget=None"):
        tc.apply(model, "pdrop", budget=8, layers=[1, 2])

    class NeedsHidden(tc.Compressor):
        requires = ("hidden_states",)

        def _compress(self, tokens, k, context):
            raise AssertionError("never called")

    with pytest.raises(ValueError, match="needs context hidden_states"):
        tc.apply(model, NeedsHidden(), budget=8)
    with pytest.raises(ValueError, match="point must be one of"):
        tc.apply(model, "random", budget=8, point="middle")
    with pytest.raises(ValueError, match="pass the strategy's name"):
        tc.apply(model, tc.create("random"), budget=8, seed=3)
    with pytest.raises(TypeError, match="not supported yet"):
        tc.apply(torch.nn.Linear(2, 2), "random", budget=8)
    with pytest.raises(tc.InvalidParameterError):
        tc.apply(model, "apet", budget=8, basis="nope")
    # a failed apply leaves nothing behind
    assert getattr(model, "_tokencomp_handle", None) is None
    with tc.apply(model, "random", budget=40):
        with pytest.raises(ValueError, match="budget 40 is out of range"):
            with torch.no_grad():
                model(**llava_prompt(model))


def test_rows_with_different_numbers_of_images_equal_rows_alone():
    from tiny_models import left_pad_batch

    model = tiny_llava(attn_implementation="eager")
    rows = [llava_prompt(model, images=2, seed=11), llava_prompt(model, images=1, seed=12)]
    batch = left_pad_batch(rows)
    with tc.apply(model, "divprune", budget=10):
        batched = greedy(model, batch)
        for row, alone in enumerate(rows):
            assert torch.equal(batched[row, -6:], greedy(model, alone)[0, -6:])


def test_text_conditioned_strategy_gets_the_instruction(model):
    inputs = llava_prompt(model, batch=2, pad=[0, 2], seed=13)
    with pytest.raises(ValueError, match="post_projector"):
        tc.apply(model, "cdpruner", budget=8)
    captured = {}

    class Spy(tc.Compressor):
        requires = ("text_embeddings",)
        text_conditioned = deterministic = True

        def _compress(self, tokens, k, context):
            captured["text"] = context.text_embeddings
            return tc.selection_result(tokens, torch.arange(k).expand(tokens.shape[0], k))

    with torch.no_grad(), tc.apply(model, Spy(), budget=8, point="post_projector"):
        model(**inputs)
    embed = model.model.get_input_embeddings()
    tail = 5  # the prompt's 2 + 3 tokens after the image
    torch.testing.assert_close(captured["text"], embed(inputs["input_ids"][:, -tail:]))
    # (a recomputation without cache would see the generated tokens as part of the instruction, so the
    # check is that generate's prefill is the forward's: the same first token)
    with tc.apply(model, "cdpruner", budget=8, point="post_projector") as handle:
        first = greedy(model, inputs)[:, inputs["input_ids"].shape[1]]
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1]
    assert torch.equal(first, logits.masked_fill(torch.arange(120) == 119, float("-inf")).argmax(-1))
    assert handle.stats[0]["tokens_out"] == 2 * 8


def test_vision_eager_switch_is_undone_when_the_tower_raises(model):
    inputs = llava_prompt(model, seed=6)
    tower = model.model.vision_tower
    attention = getattr(tower, "vision_model", tower).encoder.layers[0].self_attn

    def boom(module, args, kwargs):
        raise ZeroDivisionError("a tower that fails")

    with tc.apply(model, "visionzip", budget=12, allow_eager_fallback=True):
        with (
            pre_hooks((attention, boom)),
            pytest.raises(ZeroDivisionError, match="a tower that fails"),
            torch.no_grad(),
        ):
            model(**inputs)
        assert tower.config._attn_implementation == "sdpa"
