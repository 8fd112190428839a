"""tc.apply on tiny random LLaVA-NeXT and LLaVA-OneVision: any-res packing, newline tokens, cache, removal."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from tiny_models import first_layer_lengths, llava_next_prompt, tiny_llava_next

SIZES = [(100, 60), (40, 50)]  # 2 x 1 crops + base view, and a single crop + base view


@pytest.fixture(scope="module", params=[False, True], ids=["next", "onevision"])
def model(request):
    return tiny_llava_next(attn_implementation="eager", onevision=request.param)


def greedy(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, do_sample=False, suppress_tokens=[118, 119], **kw)


def newline_count(model, inputs):
    with torch.no_grad():
        packed = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
        ).pooler_output
    newline = model.model.image_newline
    return [int((f == newline).all(dim=-1).sum()) for f in packed], [f.shape[0] for f in packed]


def test_newlines_stay_and_the_budget_counts_the_other_tokens(model):
    inputs = llava_next_prompt(model, SIZES, seed=1)
    newlines, lengths = newline_count(model, inputs)
    with tc.apply(model, "divprune", budget=10) as handle:
        seen = first_layer_lengths(model, lambda: model(**inputs))
    visual = [length - newline for length, newline in zip(lengths, newlines)]
    assert handle.stats[0]["tokens_in"] == sum(visual) and handle.stats[0]["tokens_out"] == 20
    assert seen == [inputs["input_ids"].shape[1] - sum(v - 10 for v in visual)]


@pytest.mark.parametrize(
    "schedule", [[("divprune", 10)], [("apet", 12, {"num_basis": 4}), ("apet-llm", 16, {"num_basis": 4, "layer": 2})]]
)
def test_generation_with_cache_equals_without(model, schedule):
    inputs = llava_next_prompt(model, SIZES, seed=2)
    with tc.apply(model, schedule):
        cached = greedy(model, inputs)
        recomputed = greedy(model, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_full_budget_equals_uncompressed_and_remove_restores(model):
    inputs = llava_next_prompt(model, SIZES, seed=3)
    with torch.no_grad():
        reference = model(**inputs).logits
        with tc.apply(model, "divprune", budget=1.0):
            full = model(**inputs).logits
        with tc.apply(model, "random", budget=0.25):
            changed = model(**inputs).logits
        after = model(**inputs).logits
    assert torch.equal(full, reference) and torch.equal(after, reference)
    assert changed.shape[1] < reference.shape[1]


def test_cls_attention_follows_the_packing():
    # LLaVA-NeXT's CLIP crops each have a [CLS] row; packed like the tokens, it must equal the row of the
    # crop each packed token came from.
    model = tiny_llava_next(attn_implementation="eager")
    inputs = llava_next_prompt(model, SIZES, seed=7)
    captured = []

    class Spy(tc.Compressor):
        requires = ("cls_attention",)
        needs_attention = deterministic = True

        def _compress(self, tokens, k, context):
            captured.append((tokens[0], context.cls_attention[0]))
            return tc.selection_result(tokens, torch.arange(k).expand(tokens.shape[0], k))

    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"].flatten(0, 1), output_attentions=True)
        with tc.apply(model, Spy(), budget=4):
            model(**inputs)
    rows = out.attentions[-2][:, :, 0, 1:].mean(dim=1)  # [crops of both images (5 each, padded), 16]
    # the base view of image 0 is crop 0: its 16 tokens come first, in raster order
    torch.testing.assert_close(captured[0][1][:16], rows[0])
    # image 1 (40 x 50) has its base view at crop 5
    torch.testing.assert_close(captured[1][1][:16], rows[5])
    assert [c[1].shape[0] for c in captured] == [c[0].shape[0] for c in captured]
    with tc.apply(model, "visionzip", budget=10):
        cached = greedy(model, inputs)
        recomputed = greedy(model, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_errors(model):
    if hasattr(model.model, "apply_pooling"):  # OneVision: SigLIP, no [CLS] token
        with pytest.raises(ValueError, match=r"no \[CLS\] token"):
            tc.apply(model, "visionzip", budget=10)
    with pytest.raises(ValueError, match="post_pack"):
        tc.apply(model, "random", budget=10, point="pre_projector")


@pytest.fixture(scope="module", params=["next-video", "onevision"])
def video_model(request):
    return tiny_llava_next(
        attn_implementation="eager", onevision=request.param == "onevision", video=request.param == "next-video"
    )


@pytest.mark.parametrize("video,budget,kept", [("clip", 6, 6), ("frame", 2, 8)])
def test_videos_per_clip_or_per_frame(video_model, video, budget, kept):
    from tiny_models import llava_video_prompt

    inputs = llava_video_prompt(video_model, frames=4, seed=4, image=(100, 60))
    video_tokens = int((inputs["input_ids"] == 118).sum())
    newline = 1 if hasattr(video_model.model, "apply_pooling") else 0  # OneVision ends a video with one
    with tc.apply(video_model, "divprune", budget=budget, video=video) as handle:
        seen = first_layer_lengths(video_model, lambda: video_model(**inputs))
        cached = greedy(video_model, inputs)
        recomputed = greedy(video_model, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)
    images_in = handle.stats[0]["tokens_in"] - (video_tokens - newline)
    assert handle.stats[0]["tokens_out"] == kept + budget  # the video's tokens plus the image's own budget
    removed_video = video_tokens - newline - kept
    assert seen[0] == inputs["input_ids"].shape[1] - removed_video - (images_in - budget)


@pytest.mark.parametrize("strategy,budget,params", [("fastv", 20, {}), ("pdrop", None, {"layers": [1, 3]})])
def test_in_llm_attention_stages_decode_consistently(model, strategy, budget, params):
    from test_integration_in_llm import Replay

    inputs = llava_next_prompt(model, SIZES, seed=5)
    with tc.apply(model, Replay(tc.create(strategy, **params)), budget=budget):
        cached = greedy(model, inputs)
        recomputed = greedy(model, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)
    with torch.no_grad():
        reference = model(**inputs).logits
        with tc.apply(
            model,
            strategy,
            budget=int((inputs["input_ids"] == 119).sum()) if budget else None,
            **({"layers": [1, 3], "ratio": 1.0} if strategy == "pdrop" else {}),
        ):
            full = model(**inputs).logits
    assert torch.equal(full, reference)


def test_video_model_in_llm_stage(video_model):
    from test_integration_in_llm import Replay
    from tiny_models import llava_video_prompt

    inputs = llava_video_prompt(video_model, frames=4, seed=6)
    with tc.apply(video_model, [("divprune", 8), (Replay(tc.create("fastv")), 6)]) as handle:
        cached = greedy(video_model, inputs)
        recomputed = greedy(video_model, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert handle.stats[0]["tokens_out"] == 6


def test_batch_of_rows_with_images_of_different_sizes(model):
    from tiny_models import left_pad_batch

    rows = [
        llava_next_prompt(model, [(100, 60)], seed=8, crops=5),
        llava_next_prompt(model, [(40, 50)], seed=9, crops=5),
    ]
    batch = left_pad_batch(rows)
    assert rows[0]["input_ids"].shape[1] != rows[1]["input_ids"].shape[1]
    with tc.apply(model, "divprune", budget=6):
        batched = greedy(model, batch)
        for row, alone in enumerate(rows):
            assert torch.equal(batched[row, -5:], greedy(model, alone)[0, -5:])
