"""Train mini-llava's projector (and a small LoRA on SmolLM2) on the ``scenes`` train split.

``python -m tokencomp.analysis.mini_llava.train --out DIR [--minutes 65] [--seed 0]``: a seeded, resumable
run that a 2-core CPU finishes in about 70 minutes. The DINOv2 tower and SmolLM2's weights stay frozen.
Stage 0 (:mod:`.align`, a few minutes) fits the LLaVA-1.5-style projector to the scenes' labels (object
patches to their colour and shape words' embeddings); then the projector and, with ``--lora-rank`` > 0, a
LoRA (``peft``) on every linear layer of the language model train on the answers. Each training sequence
is one scene with about ten questions as a multi-turn conversation (LLaVA-1.5's instruction format), so
one pass over the image's tokens teaches ten answers; the loss is on the answers (and their end-of-turn
token).

What it writes to ``DIR``:

- ``mini_llava.safetensors``: the projector and, under ``lora.*``, the LoRA factors (a few megabytes),
  rewritten at every checkpoint (``--checkpoint-minutes``), with the optimiser state in ``state.pt``, so a
  killed run continues with ``--resume``;
- ``train_log.jsonl``: stage 0's losses and held-out word accuracy, then one line per step (loss,
  answer-token accuracy, questions, seconds), with the teacher-forced validation accuracy per question
  type every 8 minutes.

The trained files committed with the package come from this script with its defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import scenes
from .align import align_projector
from .answers import SUFFIX
from .model import FEATURE_LAYER, chat_prompt, load_mini_llava

__all__ = [
    "LORA_TARGETS",
    "ROUNDS",
    "SUFFIX",
    "answer_hits",
    "encode_conversation",
    "main",
    "scene_questions",
    "trained_state",
    "train",
]

#: The LM projections the LoRA adapts: every linear layer of attention and MLP.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Draws of one question per type per training scene (duplicates dropped): about 12 questions per image.
ROUNDS = 3
#: Validation scenes of the periodic check, and how often it runs.
_VAL_SCENES = 24
_VAL_MINUTES = 8.0
_END = "<|im_end|>"
#: The image side mini-llava trains at (256 image tokens).
_SIZE = 224


def encode_conversation(processor: Any, scene: scenes.Scene, questions: list[scenes.Question]) -> dict:
    """``input_ids``, ``attention_mask``, ``pixel_values`` and ``labels`` for one scene's conversation.

    The image comes before the first question; every question is a user turn (the template's system
    preamble once) and its answer an assistant turn. ``labels`` holds the answers and their end-of-turn
    tokens, ``-100`` elsewhere. Pieces are tokenised one by one (each starts after a special token or a
    newline, so the boundaries are those of the whole text).
    """
    tokenizer = processor.tokenizer
    ids: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    pixel_values = None
    for i, q in enumerate(questions):
        prompt = chat_prompt(processor, q.text + SUFFIX, images=1 if i == 0 else 0)
        if i == 0:
            first = processor(text=[prompt], images=[scene.pil()], return_tensors="pt")
            piece, pixel_values = first["input_ids"][0], first["pixel_values"]
        else:  # later turns: the template's system preamble only once
            prompt = prompt[prompt.index("<|im_start|>user") :]
            piece = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        answer = tokenizer(q.answer + _END, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        newline = tokenizer("\n", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        ids += [piece, answer, newline]
        labels += [torch.full_like(piece, -100), answer, torch.full_like(newline, -100)]
    input_ids = torch.cat(ids)[None]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        "labels": torch.cat(labels)[None],
    }


def scene_questions(scene: scenes.Scene, rounds: int, rng: random.Random) -> list[scenes.Question]:
    """``rounds`` draws of one question per type about ``scene``, duplicates dropped, in a shuffled order."""
    chosen: dict[str, scenes.Question] = {}
    for _ in range(rounds):
        for q in scenes.questions_for(scene, rng=rng.randrange(2**32)):
            chosen.setdefault(q.text, q)
    out = list(chosen.values())
    rng.shuffle(out)
    return out


def _scenes(seed: int, rounds: int) -> Iterator[tuple[scenes.Scene, list[scenes.Question]]]:
    """Training scenes in a seeded random order, each with its :func:`scene_questions`."""
    rng = random.Random(seed)
    while True:
        scene = scenes.make_scene("train", rng.randrange(10**7), image_size=_SIZE)
        yield scene, scene_questions(scene, rounds, rng)


def _trainable(model: Any, lora_rank: int, seed: int) -> Any:
    """Freeze the tower and the LM; the projector trains, and a LoRA when ``lora_rank`` > 0."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    if lora_rank > 0:
        from peft import LoraConfig, inject_adapter_in_model

        torch.manual_seed(seed)
        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=list(LORA_TARGETS), lora_dropout=0.0)
        inject_adapter_in_model(config, model.model.language_model)
    return [p for p in model.parameters() if p.requires_grad]


def trained_state(model: Any) -> dict[str, torch.Tensor]:
    """The projector's tensors and the LoRA factors (``lora.<module path>``), as saved."""
    state = {k: v.detach().clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    for name, value in model.model.language_model.named_parameters():
        if "lora_" in name:
            state[f"lora.{name}"] = value.detach().clone()
    return state


def _answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of answer tokens predicted right (teacher forcing)."""
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    return float((pred[mask] == target[mask]).float().mean()) if bool(mask.any()) else float("nan")


def answer_hits(logits: torch.Tensor, labels: torch.Tensor) -> list[bool]:
    """Per answer of a conversation (a run of labelled tokens), whether teacher forcing predicts all of it."""
    target = labels[0, 1:]
    right = (logits[0, :-1].argmax(-1) == target) | (target == -100)
    labelled = (target != -100).int()
    starts = torch.nonzero(torch.diff(labelled, prepend=labelled.new_zeros(1)) == 1).flatten().tolist()
    ends = torch.nonzero(torch.diff(labelled, append=labelled.new_zeros(1)) == -1).flatten().tolist()
    return [bool(right[a : b + 1].all()) for a, b in zip(starts, ends)]


def _validate(model: Any, processor: Any, seed: int) -> dict[str, float]:
    """Teacher-forced exact-answer accuracy per question type on :data:`_VAL_SCENES` validation scenes."""
    rng = random.Random(seed)
    hits: dict[str, list[bool]] = {}
    model.eval()
    with torch.no_grad():
        for index in range(_VAL_SCENES):
            scene = scenes.make_scene("validation", index, image_size=_SIZE)
            qs = scene_questions(scene, 1, rng)
            inputs = encode_conversation(processor, scene, qs)
            for q, hit in zip(qs, answer_hits(model(**inputs).logits, inputs["labels"])):
                hits.setdefault(q.type, []).append(hit)
    model.train()
    every = [h for v in hits.values() for h in v]
    return {"overall": sum(every) / len(every), **{k: sum(v) / len(v) for k, v in sorted(hits.items())}}


def train(
    out: Path,
    minutes: float = 65.0,
    seed: int = 0,
    lr: float = 5e-4,
    batch: int = 4,
    lora_rank: int = 8,
    lora_lr_ratio: float = 1.0,
    align_scenes: int = 2000,
    align_epochs: int = 10,
    checkpoint_minutes: float = 5.0,
    resume: bool = False,
    threads: int | None = None,
) -> None:
    """Align the projector (:mod:`.align`, ``align_scenes`` scenes, ``align_epochs`` passes; skipped when
    resuming), then train it and the LoRA for ``minutes`` of wall time (optimiser steps of ``batch`` scenes),
    checkpointing as it goes."""
    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, processor = load_mini_llava(_SIZE, seed=seed)
    meta = {
        "lora_rank": str(lora_rank),
        "lora_alpha": str(2 * lora_rank),
        "image_size": str(_SIZE),
        "feature_layer": str(FEATURE_LAYER),
        "seed": str(seed),
    }
    log = (out / "train_log.jsonl").open("a")

    def write(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()

    if not (resume and (out / "state.pt").exists()) and align_scenes > 0:
        write(align_projector(model, processor, align_scenes, align_epochs, seed, FEATURE_LAYER, log=write))
    params = _trainable(model, lora_rank, seed)
    model.train()
    projector = set(map(id, model.model.multi_modal_projector.parameters()))
    groups = [
        {"params": [p for p in params if id(p) in projector], "base_lr": lr},
        {"params": [p for p in params if id(p) not in projector], "base_lr": lr * lora_lr_ratio},
    ]
    optimiser = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=0.0)
    step, samples, spent = 0, 0, 0.0
    if resume and (out / "state.pt").exists():
        saved = torch.load(out / "state.pt", weights_only=False)
        model.load_state_dict(saved["model"], strict=False)
        optimiser.load_state_dict(saved["optimiser"])
        step, samples, spent = saved["step"], saved["samples"], saved["spent"]
    data = _scenes(seed + step, ROUNDS)
    budget = minutes * 60
    warmup = 30
    started, last_checkpoint, last_val = time.perf_counter() - spent, time.perf_counter(), time.perf_counter()
    while time.perf_counter() - started < budget:
        elapsed = time.perf_counter() - started
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget))))
        for group in optimiser.param_groups:
            group["lr"] = group["base_lr"] * scale
        losses, accs = [], []
        for _ in range(batch):
            scene, qs = next(data)
            inputs = encode_conversation(processor, scene, qs)
            output = model(**inputs)
            (output.loss / batch).backward()
            losses.append(float(output.loss.detach()))
            accs.append(_answer_accuracy(output.logits.detach(), inputs["labels"]))
            samples += len(qs)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        step += 1
        record = {
            "step": step,
            "loss": sum(losses) / len(losses),
            "answer_token_accuracy": sum(accs) / len(accs),
            "questions": samples,
            "seconds": round(time.perf_counter() - started, 1),
            "lr": lr * scale,
        }
        if time.perf_counter() - last_val > _VAL_MINUTES * 60:
            record["validation"] = _validate(model, processor, seed)
            last_val = time.perf_counter()
        write(record)
        if time.perf_counter() - last_checkpoint > checkpoint_minutes * 60:
            _checkpoint(out, model, optimiser, (step, samples, time.perf_counter() - started), meta)
            last_checkpoint = time.perf_counter()
    _checkpoint(out, model, optimiser, (step, samples, time.perf_counter() - started), meta)
    log.close()


def _checkpoint(out: Path, model: Any, optimiser: Any, progress: tuple[int, int, float], meta: dict) -> None:
    """The trained tensors (atomically replaced) and the optimiser state for ``--resume``."""
    from safetensors.torch import save_file

    step, samples, spent = progress
    save_file(trained_state(model), str(out / "mini_llava.safetensors.tmp"), metadata=meta)
    (out / "mini_llava.safetensors.tmp").replace(out / "mini_llava.safetensors")
    trainable = {k: v for k, v in model.state_dict().items() if "lora_" in k or "multi_modal_projector" in k}
    state = {"model": trainable, "optimiser": optimiser.state_dict(), "step": step, "samples": samples, "spent": spent}
    torch.save(state, out / "state.pt.tmp")
    (out / "state.pt.tmp").replace(out / "state.pt")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=65.0, help="of the second stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=4, help="scenes per optimiser step")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--align-scenes", type=int, default=2000, help="stage 0's scenes (0: no alignment)")
    parser.add_argument("--align-epochs", type=int, default=10)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    train(
        args.out,
        args.minutes,
        seed=args.seed,
        lr=args.lr,
        batch=args.batch,
        lora_rank=args.lora_rank,
        align_scenes=args.align_scenes,
        align_epochs=args.align_epochs,
        checkpoint_minutes=args.checkpoint_minutes,
        resume=args.resume,
        threads=args.threads,
    )


if __name__ == "__main__":
    main()
