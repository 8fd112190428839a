"""tc.apply under misuse: budgets larger than an image, images of different sizes, unsupported models,
removing twice, applying twice; on tiny random LLaVA-1.5, LLaVA-NeXT and Qwen2-VL."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from tiny_models import (
    first_layer_lengths,
    left_pad_batch,
    llava_next_prompt,
    llava_prompt,
    qwen_prompt,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_vl,
)
from tokencomp.integrations import SUPPORTED

# LLaVA-NeXT (tiny): a 100 x 60 image packs 48 visual tokens and 8 newlines, a 40 x 50 one 32 and 4.
NEXT_VISUAL = {(100, 60): 48, (40, 50): 32}


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def llava_next():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_vl()


MODELS = ("llava", "llava_next", "qwen")


def inputs_for(name, model, seed=0):
    """A one-row prompt with images: LLaVA 2 x 36 tokens; NeXT 48 + 32; Qwen 24 + 16."""
    if name == "llava":
        return llava_prompt(model, images=2, seed=seed)
    if name == "llava_next":
        return llava_next_prompt(model, [(100, 60), (40, 50)], seed=seed)
    return qwen_prompt([(8, 12), (8, 8)], seed=seed)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def two_sizes(model):
    """Two one-image LLaVA-NeXT rows (48 and 32 visual tokens) and their left-padded batch."""
    rows = [
        llava_next_prompt(model, [(100, 60)], seed=8, crops=5),
        llava_next_prompt(model, [(40, 50)], seed=9, crops=5),
    ]
    return rows, left_pad_batch(rows)


# ---------------------------------------------------------------- images of different sizes, fraction budget
def test_llava_next_fraction_budget_on_a_batch_of_differently_sized_images(llava_next):
    rows, batch = two_sizes(llava_next)
    # 0.3 of each image's own visual tokens: round(14.4) = 14 of 48, round(9.6) = 10 of 32
    with tc.apply(llava_next, "divprune", budget=0.3) as handle:
        seen = first_layer_lengths(llava_next, lambda: llava_next(**batch))
        alone = [logits(llava_next, r)[0, -1] for r in rows]
        batched = logits(llava_next, batch)[:, -1]
    assert handle.stats[0]["tokens_in"] == 48 + 32 and handle.stats[0]["tokens_out"] == 14 + 10
    # row 0 loses 48 - 14 = 34 placeholders, row 1 (left-padded to the same length) 32 - 10 = 22: the
    # shortened batch is as long as the row that lost fewest
    assert seen == [batch["input_ids"].shape[1] - 22]
    for row in range(2):
        torch.testing.assert_close(batched[row], alone[row], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- an int budget above an image's tokens
def test_llava_budget_above_the_images_tokens(llava):
    inputs = llava_prompt(llava, images=2, seed=1)
    with tc.apply(llava, "divprune", budget=37), pytest.raises(ValueError) as info:
        logits(llava, inputs)
    message = str(info.value)
    assert "tokencomp.apply: 'divprune': budget 37 is out of range for each of the 2 image(s) of this batch" in message
    assert "only 36 visual tokens" in message and "budget <= 36" in message and "fraction in (0, 1]" in message
    with tc.apply(llava, "divprune", budget=36) as handle:  # exactly the image's tokens: fits
        logits(llava, inputs)
    assert handle.stats[0]["tokens_out"] == 72


def test_llava_next_budget_above_one_images_tokens_names_the_image_and_row(llava_next):
    rows, batch = two_sizes(llava_next)
    with tc.apply(llava_next, "divprune", budget=40) as handle:
        with pytest.raises(ValueError) as info:
            logits(llava_next, batch)
        # the failed prefill records nothing; the handle keeps working on an image that holds 40 tokens
        logits(llava_next, rows[0])
    message = str(info.value)
    assert "budget 40 is out of range for image 1 (batch row 1; newline tokens not counted)" in message
    assert "only 32 visual tokens" in message and "budget <= 32" in message
    assert [(s["tokens_in"], s["tokens_out"]) for s in handle.stats] == [(48, 40)]


def test_qwen_budget_above_one_images_tokens_names_the_image_and_row(qwen):
    rows = [qwen_prompt([(8, 12)], seed=7), qwen_prompt([(8, 12), (8, 8)], seed=8)]
    batch = left_pad_batch(rows)
    with tc.apply(qwen, "divprune", budget=20) as handle:
        with pytest.raises(ValueError) as info:
            logits(qwen, batch)
        logits(qwen, rows[0])
    message = str(info.value)
    # images run row by row: row 0's 24-token image is image 0, row 1 holds images 1 (24) and 2 (16)
    assert "budget 20 is out of range for image 2 (batch row 1), which has only 16 visual tokens" in message
    assert "budget <= 16" in message
    assert [(s["tokens_in"], s["tokens_out"]) for s in handle.stats] == [(24, 20)]


def test_qwen_video_frame_budget_above_a_frames_tokens(qwen):
    inputs = qwen_prompt([(2, 4, 8)], seed=3)  # one video: 1 temporal patch of 2 x 4 = 8 merged tokens
    with tc.apply(qwen, "divprune", budget=9, video="frame"), pytest.raises(ValueError) as info:
        logits(qwen, inputs)
    assert "budget 9 is out of range for each frame of video 0 (batch row 0), which has only 8" in str(info.value)


def test_in_llm_budget_above_a_rows_visual_tokens(llava):
    inputs = llava_prompt(llava, images=1, batch=2, seed=2)
    with tc.apply(llava, "apet-llm", budget=37, layer=2, num_basis=3), pytest.raises(ValueError) as info:
        logits(llava, inputs)
    assert "budget 37 is out of range for every prompt row at decoder layer 2, which has only 36" in str(info.value)


@pytest.mark.parametrize("budget", [0, -3, 1.5, 0.0, float("nan"), True, "8"])
def test_invalid_budget_is_refused_before_any_hook(llava, budget):
    message = r"tokencomp.apply: 'random': budget must be an int >= 1 \(tokens kept\) or a float in \(0, 1\]"
    with pytest.raises(ValueError, match=message):
        tc.apply(llava, "random", budget=budget)
    assert getattr(llava, "_tokencomp_handle", None) is None and not llava.model._forward_pre_hooks


# ---------------------------------------------------------------- applying twice, removing twice
@pytest.mark.parametrize("name", MODELS)
def test_apply_twice_and_remove_twice(request, name):
    model = request.getfixturevalue(name)
    inputs = inputs_for(name, model, seed=5)
    reference = logits(model, inputs)
    with tc.apply(model, "divprune", budget=8) as first:
        expected = logits(model, inputs)
        with pytest.raises(
            RuntimeError, match=r"already has a compression applied \(divprune\(8\)\); call handle.remove\(\)"
        ):
            tc.apply(model, "random", budget=4)
        with pytest.raises(RuntimeError, match="already has a compression applied"):
            tc.apply(model, "apet-llm", budget=4, layer=2)
        # the refused applications left the first one as it was
        assert torch.equal(logits(model, inputs), expected) and len(first.stats) == 2
        assert first.stats[0]["tokens_out"] == first.stats[1]["tokens_out"] == 16
    assert first.removed and expected.shape[1] < reference.shape[1]
    with pytest.raises(RuntimeError, match=r"this compression \(divprune\(8\)\) was already removed"):
        first.remove()
    # the refused second removal undid nothing twice: the model is the original
    assert torch.equal(logits(model, inputs), reference) and getattr(model, "_tokencomp_handle", None) is None
    handle = tc.apply(model, "random", budget=4)  # after removal, a new one applies
    handle.remove()
    with pytest.raises(RuntimeError, match=r"this compression \(random\(4\)\) was already removed"):
        handle.remove()


def test_remove_twice_in_llm_only(llava):
    handle = tc.apply(llava, "apet-llm", budget=8, layer=2, num_basis=3)
    handle.remove()
    with pytest.raises(RuntimeError, match=r"apet-llm.*already removed"):
        handle.remove()
    assert not any(layer._forward_pre_hooks for layer in llava.model.language_model.layers)


# ---------------------------------------------------------------- unsupported models
def _tiny_bert():
    from transformers import BertConfig, BertModel

    return BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
    )


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32))


@pytest.mark.parametrize(
    "build,name",
    [(lambda: torch.nn.Linear(2, 2), "Linear"), (_tiny_bert, "BertModel"), (_tiny_gpt2, "GPT2LMHeadModel")],
)
def test_unsupported_model_names_the_supported_classes(build, name):
    model = build()
    with pytest.raises(TypeError) as info:
        tc.apply(model, "random", budget=8)
    message = str(info.value)
    assert message.startswith(f"tokencomp.apply: {name} is not supported yet; supported model classes: ")
    assert all(cls in message for cls in SUPPORTED)
    assert getattr(model, "_tokencomp_handle", None) is None and not model._forward_pre_hooks
