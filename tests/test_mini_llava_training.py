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
from tokencomp.analysis.mini_llava.train import (
    LORA_TARGETS,
    answer_hits,
    encode_conversation,
    scene_questions,
    trained_state,
)
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


def test_weights_of_another_feature_layer_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"linear_1.weight": torch.zeros(1)}, str(tmp_path / "old.safetensors"), metadata={"feature_layer": "-1"})
    with pytest.raises(InputError, match=r"hidden state '-1'.*vision_feature_layer=-5. Retrain"):
        trained.load_trained_mini_llava(tmp_path / "old.safetensors")


def test_answer_hits_by_hand():
    """Each run of labelled tokens is one answer; it is a hit when teacher forcing predicts all of it."""
    labels = torch.tensor([[-100, -100, 7, 8, -100, -100, 9, -100, 5]])
    predicted = torch.tensor([0, 7, 8, 0, 0, 9, 0, 4])  # the prediction at t is for the token at t + 1
    logits = torch.nn.functional.one_hot(torch.cat([predicted, torch.tensor([0])]), 10).float()[None]
    assert answer_hits(logits, labels) == [True, True, False]
    logits[0, 2] = torch.nn.functional.one_hot(torch.tensor(3), 10).float()  # the 8 is missed
    assert answer_hits(logits, labels) == [False, True, False]


def test_training_scenes_get_several_distinct_questions():
    import random

    scene = scenes.make_scene("train", 11, image_size=224)
    qs = scene_questions(scene, 3, random.Random(0))
    assert len({q.text for q in qs}) == len(qs) >= 5 and {q.type for q in qs} >= {"count", "colour", "shape"}
    assert [q.text for q in scene_questions(scene, 3, random.Random(0))] == [q.text for q in qs]  # seeded


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


class _Words:
    """A tokenizer of whole words: ``triangle`` is two tokens, every other word one."""

    vocab = {w: i for i, w in enumerate([*scenes.COLOURS, *scenes.SHAPES, "background", "tri", "angle"])}

    def __call__(self, word, add_special_tokens=False):
        ids = [self.vocab["tri"], self.vocab["angle"]] if word == "triangle" else [self.vocab[word]]
        return {"input_ids": ids}


def test_alignment_targets_are_the_objects_words_inside_their_boxes():
    from tokencomp.analysis.mini_llava.align import patch_targets

    scene = scenes.make_scene("train", 5, image_size=224)
    embeddings = torch.randn(len(_Words.vocab), 4, generator=torch.Generator().manual_seed(0))
    target = patch_targets(scene, _Words(), embeddings)
    assert target.shape == (256, 4)
    e = {w: embeddings[i] for w, i in _Words.vocab.items()}
    e["triangle"] = (e["tri"] + e["angle"]) / 2
    inside = torch.zeros(256, dtype=torch.bool)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        col, row = int((obj.centre[0]) // 14), int((obj.centre[1]) // 14)  # the patch holding the centre
        centre = (col * 14 + 7, row * 14 + 7)
        if x0 <= centre[0] < x1 and y0 <= centre[1] < y1:
            torch.testing.assert_close(target[row * 16 + col], (e[obj.colour] + e[obj.shape]) / 2)
        rows = [r for r in range(16) if y0 <= r * 14 + 7 < y1]
        cols = [c for c in range(16) if x0 <= c * 14 + 7 < x1]
        inside[[r * 16 + c for r in rows for c in cols]] = True
    assert bool(inside.any()) and not bool(inside.all())
    torch.testing.assert_close(target[~inside], e["background"].expand(int((~inside).sum()), -1))
