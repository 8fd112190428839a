"""Answer a question about an image with a real checkpoint, with and without compression.

The loading is the real thing (``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained``);
the command line's ``tokencomp generate`` is a thin wrapper around :func:`compare_answers`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from tokencomp.integrations import apply


@dataclass
class Answer:
    """One generation: the decoded answer and what the prefill saw."""

    label: str
    text: str
    prompt_tokens: int
    visual_tokens_in: int
    visual_tokens_out: int
    seconds: float


def load(model_id: str, attn_implementation: Optional[str] = None) -> tuple[Any, Any]:
    """``(processor, model)`` from a hub id or a local folder, in eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_id)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs).eval()
    return processor, model


def load_image(spec: str):
    """A PIL image from a file path, or one of the bundled images by name (e.g. ``astronaut``)."""
    from PIL import Image

    from .data import BUNDLED_IMAGES, bundled_images, read_image

    path = Path(spec)
    if path.exists():
        return Image.fromarray(read_image(path))
    if spec in BUNDLED_IMAGES:
        ((_, array),) = bundled_images([spec])
        return Image.fromarray(array)
    raise FileNotFoundError(
        f"--image {spec!r} is neither a file nor a bundled image; bundled: {', '.join(BUNDLED_IMAGES)}"
    )


def build_inputs(processor: Any, image: Any, prompt: str) -> dict:
    """Processor inputs for one image and one question (the chat template when the processor has one)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        token = getattr(processor, "image_token", "<image>")
        text = prompt if token in prompt else f"{token} {prompt}"
    return dict(processor(images=image, text=text, return_tensors="pt"))


def _generate(model: Any, processor: Any, inputs: dict, max_new_tokens: int) -> tuple[str, float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip(), seconds


def compare_answers(
    model: Any,
    processor: Any,
    inputs: dict,
    strategy: str,
    budget: int | float,
    params: dict[str, Any],
    max_new_tokens: int = 32,
    allow_eager_fallback: bool = False,
) -> list[Answer]:
    """The uncompressed answer, then the answer with ``strategy`` at ``budget``."""
    image_id = getattr(model.config, "image_token_id", None)
    visual = int((inputs["input_ids"] == image_id).sum()) if image_id is not None else 0
    length = int(inputs["input_ids"].shape[1])
    text, seconds = _generate(model, processor, inputs, max_new_tokens)
    answers = [Answer("uncompressed", text, length, visual, visual, seconds)]
    with apply(model, strategy, budget, allow_eager_fallback=allow_eager_fallback, **params) as handle:
        text, seconds = _generate(model, processor, inputs, max_new_tokens)
    first = handle.stats[0] if handle.stats else {}
    last = handle.stats[-1] if handle.stats else {}
    label = f"{strategy} budget={budget}" + "".join(f" {k}={v}" for k, v in params.items())
    answers.append(Answer(label, text, length, first.get("tokens_in", visual), last.get("tokens_out", visual), seconds))
    return answers
