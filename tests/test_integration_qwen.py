"""tc.apply on tiny random Qwen2-VL and Qwen2.5-VL: M-RoPE positions kept, cache correctness, restoration."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from tiny_models import pre_hooks, qwen_prompt, tiny_qwen2_vl

SIZES = [(8, 12), (8, 8)]  # patches; merged tokens 24 and 16 per image


@pytest.fixture(scope="module", params=["2", "2.5"])
def model(request):
    return tiny_qwen2_vl(version=request.param)


def greedy(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, do_sample=False, suppress_tokens=[151, 152], **kw)


def language_inputs(model, run):
    seen = {}

    def spy(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"].shape[1])
        seen.setdefault("positions", kwargs["position_ids"])

    with pre_hooks((model.model.language_model, spy)), torch.no_grad():
        run()
    return seen


@pytest.mark.parametrize(
    "strategy,budget,kept", [("apet", 0.5, (12, 8)), ("divprune", 6, (6, 6)), ("pooling", 0.25, (6, 4))]
)
def test_language_model_sees_the_budget_and_original_positions(model, strategy, budget, kept):
    inputs = qwen_prompt(SIZES, batch=2, pad=[0, 3], seed=1)
    params = {"num_basis": 3} if strategy == "apet" else {}
    rope, _ = model.model.get_rope_index(
        inputs["input_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )
    with tc.apply(model, strategy, budget=budget, **params) as handle:
        seen = language_inputs(model, lambda: model(**inputs))
    removed = (24 - kept[0]) + (16 - kept[1])
    assert seen["embeds"] == inputs["input_ids"].shape[1] - removed
    assert handle.stats[0]["tokens_in"] == 80 and handle.stats[0]["tokens_out"] == 2 * sum(kept)
    positions = seen["positions"]  # [4, B, L']: text row, then the three M-RoPE rows
    assert positions.shape[0] == 4
    # every kept token sits at one of the original M-RoPE positions of its row, in the original order
    for b in range(2):
        original = {tuple(rope[:, b, i].tolist()) for i in range(rope.shape[2])}
        kept_positions = [tuple(positions[1:, b, i].tolist()) for i in range(positions.shape[2])]
        assert set(kept_positions) <= original
    # the text after the last image keeps its original positions
    torch.testing.assert_close(positions[1:, :, -3:], rope[:, :, -3:])


@pytest.mark.parametrize("strategy,budget", [("apet", 0.5), ("divprune", 6), ("random", 0.3)])
def test_generation_with_cache_equals_without(model, strategy, budget):
    inputs = qwen_prompt(SIZES, batch=2, pad=[2, 0], seed=2)
    params = {"num_basis": 3} if strategy == "apet" else {}
    with tc.apply(model, strategy, budget=budget, **params):
        cached = greedy(model, inputs)
        recomputed = greedy(model, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_rope_deltas_continue_after_the_kept_tokens(model):
    # Decoding after a compressed prefill must use the original next position (max original position + 1),
    # i.e. rope_deltas rise by the number of tokens removed from each row.
    inputs = qwen_prompt(SIZES, batch=2, pad=[0, 3], seed=3)
    rope, deltas = model.model.get_rope_index(
        inputs["input_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )
    with torch.no_grad(), tc.apply(model, "divprune", budget=6):
        model(**inputs)
        removed = (24 - 6) + (16 - 6)
        assert model.model.rope_deltas.tolist() == (deltas + removed).tolist()
        real = inputs["attention_mask"].sum(dim=1, keepdim=True) - removed  # tokens the cache holds per row
        next_position = real + model.model.rope_deltas  # what compute_3d_position_ids gives the next token
        assert next_position.view(-1).tolist() == (rope.amax(dim=(0, 2)) + 1).tolist()


def test_full_budget_selection_equals_uncompressed(model):
    inputs = qwen_prompt(SIZES, batch=2, pad=[0, 2], seed=4)
    with torch.no_grad():
        reference = model(**inputs).logits
        with tc.apply(model, "divprune", budget=1.0):
            compressed = model(**inputs).logits
    assert torch.equal(compressed, reference)


def test_remove_restores_exactly(model):
    inputs = qwen_prompt(SIZES, seed=5)
    before = greedy(model, inputs)
    deltas = model.model.rope_deltas.clone()
    with tc.apply(model, "apet", budget=8, num_basis=3):
        greedy(model, inputs)
    assert torch.equal(model.model.rope_deltas, deltas)
    assert torch.equal(greedy(model, inputs), before)
    assert not model.model._forward_pre_hooks and not model.model.visual._forward_pre_hooks


def test_errors(model):
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        tc.apply(model, "visionzip", budget=8)
    with pytest.raises(ValueError, match="post_merger"):
        tc.apply(model, "random", budget=8, point="pre_projector")
    inputs = qwen_prompt([(8, 12)], batch=2, seed=6)
    inputs["image_grid_thw"] = torch.tensor([[1, 8, 12], [1, 8, 12]])
    with tc.apply(model, "random", budget=30):
        with pytest.raises(ValueError, match="budget 30 is out of range"):
            with torch.no_grad():
                model(**inputs)


def test_rows_with_images_of_different_sizes_equal_rows_alone(model):
    from tiny_models import left_pad_batch

    rows = [qwen_prompt([(8, 12)], seed=7), qwen_prompt([(8, 8), (4, 8)], seed=8)]
    batch = left_pad_batch(rows)
    with tc.apply(model, "divprune", budget=0.5):
        batched = greedy(model, batch)
        for row, alone in enumerate(rows):
            assert torch.equal(batched[row, -5:], greedy(model, alone)[0, -5:])


@pytest.fixture(scope="module", params=["2", "2.5"])
def eager_qwen(request):
    return tiny_qwen2_vl(attn_implementation="eager", version=request.param)


@pytest.mark.parametrize(
    "schedule",
    [
        [("apet-llm", 20, {"num_basis": 3, "layer": 2})],
        [("apet", 0.5, {"num_basis": 3}), ("apet-llm", 12, {"num_basis": 3, "layer": 2})],
    ],
)
def test_in_llm_and_two_stage_schedule_cache_equals_no_cache(eager_qwen, schedule):
    inputs = qwen_prompt(SIZES, batch=2, pad=[0, 2], seed=9)
    with tc.apply(eager_qwen, schedule) as handle:
        cached = greedy(eager_qwen, inputs)
        recomputed = greedy(eager_qwen, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)
    stages = {s["stage"]: (s["tokens_in"], s["tokens_out"]) for s in handle.stats}
    assert stages["in_llm@2"][1] == 2 * schedule[-1][1]


@pytest.mark.parametrize(
    "strategy,budget,params", [("fastv", 10, {}), ("dart-llm", 10, {}), ("pdrop", None, {"layers": [1, 3]})]
)
def test_text_conditioned_stages_cache_equals_recomputation_with_the_same_picks(eager_qwen, strategy, budget, params):
    from test_integration_in_llm import Replay

    inputs = qwen_prompt(SIZES, batch=2, pad=[2, 0], seed=10)
    with tc.apply(eager_qwen, Replay(tc.create(strategy, **params)), budget=budget):
        cached = greedy(eager_qwen, inputs)
        recomputed = greedy(eager_qwen, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize(
    "strategy,budget,params", [("fastv", 40, {}), ("pdrop", None, {"layers": [1, 2], "ratio": 1.0})]
)
def test_in_llm_full_budget_equals_uncompressed(eager_qwen, strategy, budget, params):
    inputs = qwen_prompt(SIZES, batch=2, pad=[0, 3], seed=11)
    with torch.no_grad():
        reference = eager_qwen(**inputs).logits
        with tc.apply(eager_qwen, strategy, budget=budget, **params):
            compressed = eager_qwen(**inputs).logits
    assert torch.equal(compressed, reference)


@pytest.mark.parametrize("video,budget,kept", [("clip", 12, 12), ("frame", 4, 12), ("clip", 0.25, 12)])
def test_video_per_clip_or_per_frame(model, video, budget, kept):
    # a clip of 3 temporal patches of 8 x 8 patches (16 merged tokens each: 48) beside an image
    inputs = qwen_prompt([(3, 8, 8), (8, 8)], batch=2, pad=[0, 2], seed=12)
    with tc.apply(model, "divprune", budget=budget, video=video) as handle:
        seen = language_inputs(model, lambda: model(**inputs))
        cached = greedy(model, inputs)
        recomputed = greedy(model, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)
    image_kept = budget if isinstance(budget, int) else round(budget * 16)
    removed = (48 - kept) + (16 - image_kept)
    assert seen["embeds"] == inputs["input_ids"].shape[1] - removed
    assert handle.stats[0]["tokens_in"] == 2 * 64 and handle.stats[0]["tokens_out"] == 2 * (kept + image_kept)


def test_video_frames_each_keep_their_budget(model):
    inputs = qwen_prompt([(3, 8, 8)], seed=13)
    original = model.model.get_rope_index(
        inputs["input_ids"],
        video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )[0]
    shortened = {}

    def spy(module, args, kwargs):
        shortened["ids"] = kwargs["input_ids"]

    with tc.apply(model, "divprune", budget=5, video="frame"):
        with pre_hooks((model.model, spy)):  # runs after ours
            seen = language_inputs(model, lambda: model(**inputs))
    video = shortened["ids"][0] == 152
    temporal = seen["positions"][1, 0][video]
    frames = original[0, 0][inputs["input_ids"][0] == 152].unique()  # the three temporal positions
    assert [int((temporal == f).sum()) for f in frames] == [5, 5, 5]


def test_cdpruner_gets_each_rows_instruction(model):
    inputs = qwen_prompt(SIZES, batch=2, pad=[0, 2], seed=14)
    captured = []

    class Spy(tc.Compressor):
        requires = ("text_embeddings",)
        text_conditioned = deterministic = True

        def _compress(self, tokens, k, context):
            captured.append(context.text_embeddings)
            return tc.selection_result(tokens, torch.arange(k).expand(tokens.shape[0], k))

    with torch.no_grad(), tc.apply(model, Spy(), budget=6):
        model(**inputs)
    tail = model.model.get_input_embeddings()(inputs["input_ids"][:, -6:])  # vision_end, then 2 + 3 tokens
    assert [t.shape for t in captured] == [torch.Size([1, 6, 64])] * 4  # two images in each of two rows
    for item, row in zip(captured, [0, 0, 1, 1]):
        torch.testing.assert_close(item[0], tail[row])
    with tc.apply(model, "cdpruner", budget=6) as handle:
        first = greedy(model, inputs)[:, inputs["input_ids"].shape[1]]
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1]
    assert torch.equal(
        first, logits.masked_fill((torch.arange(160) == 151) | (torch.arange(160) == 152), float("-inf")).argmax(-1)
    )
    assert handle.stats[0]["tokens_out"] == 2 * 2 * 6


@pytest.fixture(scope="module")
def qwen3():
    return tiny_qwen2_vl(attn_implementation="eager", version="3")


def qwen3_prompt(**kw):
    return qwen_prompt(SIZES, patch=16, **kw)


@pytest.mark.parametrize(
    "strategy,budget,params", [("divprune", 6, {}), ("tome", 8, {}), ("apet", 0.5, {"num_basis": 3})]
)
def test_qwen3_deepstack_follows_the_selection(qwen3, strategy, budget, params):
    inputs = qwen3_prompt(batch=2, pad=[0, 2], seed=15)
    with tc.apply(qwen3, strategy, budget=budget, **params):
        cached = greedy(qwen3, inputs)
        recomputed = greedy(qwen3, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_qwen3_deepstack_of_a_kept_token_is_its_own(qwen3):
    inputs = qwen3_prompt(seed=16)
    with torch.no_grad():
        reference = qwen3(**inputs).logits
        with tc.apply(qwen3, "divprune", budget=1.0):
            full = qwen3(**inputs).logits
    assert torch.equal(full, reference)
    from tokencomp.integrations.qwen2_vl import _group_mean

    features = torch.arange(12.0).view(4, 3)
    torch.testing.assert_close(
        _group_mean(features, torch.tensor([0, 0, 1, -1]), 2), torch.tensor([[1.5, 2.5, 3.5], [6.0, 7.0, 8.0]])
    )


def test_qwen3_in_llm_stage_after_deepstack(qwen3):
    with pytest.raises(ValueError, match="DeepStack"):
        tc.apply(qwen3, "apet-llm", budget=16, layer=1, num_basis=3)
    inputs = qwen3_prompt(batch=2, pad=[2, 0], seed=17)
    with tc.apply(qwen3, [("divprune", 10), ("apet-llm", 12, {"layer": 2, "num_basis": 3})]) as handle:
        cached = greedy(qwen3, inputs)
        recomputed = greedy(qwen3, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert {s["stage"] for s in handle.stats} == {"pre_llm", "in_llm@2"}


def test_qwen3_counts_attention_stage_and_removal(qwen3):
    from test_integration_in_llm import Replay

    inputs = qwen3_prompt(batch=2, pad=[0, 3], seed=18)
    with torch.no_grad():
        before = qwen3(**inputs).logits
    with tc.apply(qwen3, "divprune", budget=6):
        seen = language_inputs(qwen3, lambda: qwen3(**inputs))
    assert seen["embeds"] == inputs["input_ids"].shape[1] - (24 - 6) - (16 - 6)
    with tc.apply(qwen3, Replay(tc.create("fastv")), budget=10):
        cached = greedy(qwen3, inputs)
        recomputed = greedy(qwen3, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)
    with torch.no_grad():
        after = qwen3(**inputs).logits
    assert torch.equal(before, after)
