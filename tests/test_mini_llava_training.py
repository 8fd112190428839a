"""mini-llava's training pieces: the conversation's labels, the LoRA merge, the answer accuracy.

The encoding test needs SmolLM2's tokenizer (the pretrained parts; skipped, saying why, without them);
the merge and the accuracy arithmetic run on small hand-made inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tokencomp.analysis import scenes
from tokencomp.analysis.mini_llava import answers, model, trained
from tokencomp.analysis.mini_llava.train import LORA_TARGETS, encode_conversation, trained_state
from tokencomp.errors import InputError, WeightsUnavailableError


def _question(qtype: str, answer: str) -> scenes.Question:
    return scenes.Question(text="?", answer=answer, type=qtype, cells=(), template=f"{qtype}/x")


def test_normalise_and_accuracy_by_hand():
    assert answers.normalise(" Red.\nmore") == "red"
    assert answers.normalise("top-left") == "top-left"
    pairs = [
        (_question("count", "3"), "3"),
        (_question("count", "3"), "4"),
        (_question("colour", "red"), "Red."),
        (_question("existence", "yes"), "no"),
    ]
    table = answers.accuracy(pairs)
    assert table["count"] == {"accuracy": 0.5, "n": 2}
    assert table["colour"] == {"accuracy": 1.0, "n": 1}
    assert table["existence"] == {"accuracy": 0.0, "n": 1}
    assert table["overall"] == {"accuracy": 0.5, "n": 4}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_merged_lora_equals_peft_adapter():
    from peft import LoraConfig, inject_adapter_in_model

    base = _tiny_llama()
    adapted = copy.deepcopy(base)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS)), adapted.model)
    torch.manual_seed(1)
    factors = {}
    for name, value in adapted.model.named_parameters():
        if "lora_" in name:
            value.data.normal_(std=0.3)  # lora_B starts at zero: make the adapter do something
            factors[name] = value.detach().clone()
    assert len(factors) == 2 * 2 * len(LORA_TARGETS)  # A and B, per layer, per target
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = adapted(ids).logits
        trained.merge_lora(base.model, factors, scale=8 / 4)
        merged = base(ids).logits
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


def test_merge_refuses_a_lora_of_another_model():
    base = _tiny_llama()
    factors = {
        "layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(4, 99),
        "layers.0.self_attn.q_proj.lora_B.default.weight": torch.zeros(16, 4),
    }
    with pytest.raises(InputError, match="does not fit"):
        trained.merge_lora(base.model, factors, scale=1.0)


def test_missing_trained_weights_say_how_to_train(tmp_path):
    with pytest.raises(InputError, match="mini_llava.train --out"):
        trained.load_trained_mini_llava(tmp_path / "none.safetensors")


@pytest.fixture(scope="module")
def processor():
    try:
        return model.load_mini_llava(224)[1]
    except WeightsUnavailableError as error:
        pytest.skip(f"the pretrained parts cannot be obtained here: {error}")


def test_conversation_labels_are_the_answers(processor):
    scene = scenes.make_scene("train", 3, image_size=224)
    qs = scenes.questions_for(scene)[:3]
    batch = encode_conversation(processor, scene, qs)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    tokenizer = processor.tokenizer
    assert tokenizer.decode(labels[labels != -100]) == "".join(q.answer + "<|im_end|>" for q in qs)
    image_id = tokenizer.convert_tokens_to_ids(model.IMAGE_TOKEN)
    assert int((ids == image_id).sum()) == 256  # one image, before the first question
    text = tokenizer.decode(ids[ids != image_id])
    assert text.count("<|im_start|>system") == 1 and text.count("<|im_start|>user") == 3
    assert batch["pixel_values"].shape == (1, 3, 224, 224)


def test_trained_state_holds_projector_and_lora():
    from peft import LoraConfig, inject_adapter_in_model

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.multi_modal_projector = torch.nn.Linear(3, 3)
            self.language_model = _tiny_llama().model

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

    outer = Outer()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=list(LORA_TARGETS)), outer.model.language_model)
    state = trained_state(outer)
    assert {"weight", "bias"} <= set(state)
    assert sum(k.startswith("lora.") for k in state) == 2 * 2 * len(LORA_TARGETS)
