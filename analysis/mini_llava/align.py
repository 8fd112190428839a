"""Stage 0 of mini-llava's training: the projector aligned with SmolLM2's word embeddings by the scenes' labels.

LLaVA's first stage teaches the projector, on half a million captions, to emit tokens the frozen language
model can read. A 2-core CPU cannot afford that, but every ``scenes`` image comes with its labels, so the
projector gets a direct target instead: a patch token whose 14 px patch centre lies in an object's box
should map to the mean of the input embeddings of the object's colour word and shape word (the words its
answers use, e.g. ``red`` and ``circle``), every other patch to the embedding of ``background``. The
tower is frozen, so its features are computed once for ``scenes`` training images; the projector
(LLaVA-1.5's two-layer MLP, 0.55 M parameters) then trains on them in seconds per epoch, by mean squared
error. :mod:`.train` starts from this projector and trains it further, with the LoRA, on the answers.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import torch

from .. import scenes

__all__ = ["BACKGROUND", "align_projector", "patch_targets", "tower_features"]

#: The word the patches outside every object are aligned with.
BACKGROUND = "background"


def _word(tokenizer: Any, embeddings: torch.Tensor, word: str) -> torch.Tensor:
    """The mean input embedding of ``word``'s tokens (as an answer spells it: no leading space)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return embeddings[torch.tensor(ids)].mean(0)


def patch_targets(scene: scenes.Scene, tokenizer: Any, embeddings: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """``[N, D]`` targets of a scene's patch tokens (row-major): the mean of the colour's and the shape's word
    embeddings for a patch whose centre lies in an object's box, the :data:`BACKGROUND` embedding elsewhere."""
    side = scene.image_size // patch
    centre = (torch.arange(side, dtype=torch.float32) + 0.5) * patch
    ys, xs = centre[:, None].expand(side, side).flatten(), centre[None, :].expand(side, side).flatten()
    target = _word(tokenizer, embeddings, BACKGROUND).expand(side * side, -1).clone()
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        words = (_word(tokenizer, embeddings, obj.colour) + _word(tokenizer, embeddings, obj.shape)) / 2
        target[inside] = words
    return target


@torch.no_grad()
def tower_features(model: Any, processor: Any, images: list[Any], layer: int, batch: int = 16) -> torch.Tensor:
    """``[B, N, 384]`` patch features of PIL ``images`` at the tower's hidden state ``layer`` ([CLS] dropped)."""
    out = []
    for start in range(0, len(images), batch):
        pixels = processor.image_processor(images=images[start : start + batch], return_tensors="pt")["pixel_values"]
        hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        out.append(hidden[:, 1:].float())
    return torch.cat(out)


def align_projector(
    model: Any,
    processor: Any,
    n_scenes: int,
    epochs: int,
    seed: int,
    layer: int,
    lr: float = 1e-3,
    batch: int = 16,
    log: Any = None,
) -> dict[str, float]:
    """Fit ``model``'s projector (in place) to :func:`patch_targets` on ``n_scenes`` training scenes.

    The scenes are drawn from the train split with ``seed``; ``batch`` scenes per Adam step, ``epochs`` passes.
    Returns the final training loss and the held-out loss on the last tenth of the scenes (never trained
    on), each relative to the targets' mean square (1.0: no better than zeros).
    """
    started = time.perf_counter()
    rng = random.Random(seed)
    size = processor.image_processor.crop_size["height"]
    drawn = [scenes.make_scene("train", rng.randrange(10**7), image_size=size) for _ in range(n_scenes)]
    embeddings = model.get_input_embeddings().weight.detach()
    features = tower_features(model, processor, [s.pil() for s in drawn], layer)
    targets = torch.stack([patch_targets(s, processor.tokenizer, embeddings) for s in drawn])
    held = max(1, n_scenes // 10)
    train_x, train_y, test_x, test_y = features[:-held], targets[:-held], features[-held:], targets[-held:]
    projector = model.model.multi_modal_projector
    optimiser = torch.optim.Adam(projector.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    scale = float(targets.pow(2).mean())
    steps = epochs * math.ceil(len(train_x) / batch)
    loss = torch.tensor(math.nan)
    for step in range(steps):
        idx = torch.randint(0, len(train_x), (batch,), generator=g)
        loss = torch.nn.functional.mse_loss(projector(train_x[idx]), train_y[idx]) / scale
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log({"align_step": step, "align_loss": float(loss), "seconds": round(time.perf_counter() - started, 1)})
    with torch.no_grad():
        predicted = projector(test_x)
        held_loss = float(torch.nn.functional.mse_loss(predicted, test_y)) / scale
        # which of the 31 targets (colour x shape, background) is nearest, on the held-out object patches
        names = [(c, s) for c in scenes.COLOURS for s in scenes.SHAPES]
        words = torch.stack(
            [
                (_word(processor.tokenizer, embeddings, c) + _word(processor.tokenizer, embeddings, s)) / 2
                for c, s in names
            ]
            + [_word(processor.tokenizer, embeddings, BACKGROUND)]
        )
        truth = torch.cdist(test_y.flatten(0, 1), words).argmin(-1)
        nearest = torch.cdist(predicted.flatten(0, 1), words).argmin(-1)
        objects = truth != len(names)
        word_accuracy = float((nearest[objects] == truth[objects]).float().mean())
        background_accuracy = float((nearest[~objects] == truth[~objects]).float().mean())
    return {
        "align_loss": float(loss),
        "align_heldout_loss": held_loss,
        "align_heldout_object_word_accuracy": word_accuracy,
        "align_heldout_background_accuracy": background_accuracy,
        "align_seconds": time.perf_counter() - started,
    }
