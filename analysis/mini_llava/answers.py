"""mini-llava's answers to ``scenes`` questions, and their exact-match accuracy per question type.

``python -m tokencomp.analysis.mini_llava.answers --projector FILE [--split test] [--n 500]`` prints the
accuracy table of a trained projector; :func:`answer` and :func:`accuracy` are what the analysis builds on.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import torch

from .. import scenes
from .model import chat_prompt

__all__ = ["SUFFIX", "accuracy", "answer", "normalise"]

#: Appended to every question, in training and evaluation.
SUFFIX = " Answer with one word."


def normalise(text: str) -> str:
    """The reply as compared with the answer: first line, lower case, outer spaces and a final '.' dropped."""
    line = text.strip().split("\n", 1)[0].strip().lower()
    return line[:-1] if line.endswith(".") else line


def answer(model: Any, processor: Any, scene: scenes.Scene, question: scenes.Question, max_new_tokens: int = 6) -> str:
    """mini-llava's greedy reply to ``question`` about ``scene`` (one user turn with the image first)."""
    prompt = chat_prompt(processor, question.text + SUFFIX)
    inputs = processor(text=[prompt], images=[scene.pil()], return_tensors="pt")
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def accuracy(pairs: Iterable[tuple[scenes.Question, str]]) -> dict[str, dict[str, float]]:
    """Exact-match accuracy and count per question type and ``"overall"``, from ``(question, reply)`` pairs."""
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for question, reply in pairs:
        hit = int(normalise(reply) == question.answer)
        for key in (question.type, "overall"):
            right[key] += hit
            total[key] += 1
    return {k: {"accuracy": right[k] / total[k], "n": total[k]} for k in total}


def main(argv: list[str] | None = None) -> None:
    from ..vqa import VQABench  # its shared image prefix: each scene's image runs once for its questions
    from .trained import load_trained_mini_llava

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=None, help="the trained file (default: the packaged one)")
    parser.add_argument("--split", default="test", choices=scenes.SPLITS)
    parser.add_argument("--n", type=int, default=500, help="questions")
    parser.add_argument("--out", type=Path, default=None, help="write the table and replies as JSON here")
    args = parser.parse_args(argv)
    model, processor = load_trained_mini_llava(args.weights)
    size = processor.image_processor.crop_size["height"]
    data = scenes.dataset(args.split, args.n, image_size=size)
    replies = VQABench(model, processor, data, per_question_n=0).full.replies
    pairs = [(q, reply) for (_, q), reply in zip(data, replies)]
    rows = [{**q.to_dict(), "reply": reply, "seed": s.seed} for (s, q), reply in zip(data, replies)]
    table = accuracy(pairs)
    chance = scenes.chance_accuracy([q for q, _ in pairs])
    for key, value in sorted(table.items()):
        print(f"{key:10s} {value['accuracy']:.3f}  (n={value['n']}, chance {chance.get(key, float('nan')):.3f})")
    if args.out:
        args.out.write_text(json.dumps({"split": args.split, "accuracy": table, "chance": chance, "replies": rows}))


if __name__ == "__main__":
    main()
