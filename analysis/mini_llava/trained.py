"""The trained mini-llava: the projector and the LoRA that ``train.py`` wrote, merged into the model.

The file (``trained/mini_llava.safetensors`` in this package by default) holds the projector's tensors
under their ``LlavaMultiModalProjector`` names and the LoRA factors under ``lora.<module path>.lora_A`` /
``lora_B``, with the rank and alpha in its metadata. Loading merges each LoRA into its linear layer
(``W + alpha / r * B A``), so the result is a plain ``LlavaForConditionalGeneration`` that every
integration path runs unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from tokencomp.errors import InputError

from .model import FEATURE_LAYER, load_mini_llava

__all__ = ["TRAINED", "load_trained_mini_llava", "merge_lora"]

#: The weights trained by ``train.py`` with its defaults (224 px, seed 0), shipped with the package.
TRAINED = Path(__file__).with_name("trained") / "mini_llava.safetensors"


def merge_lora(language_model: torch.nn.Module, factors: dict[str, torch.Tensor], scale: float) -> None:
    """Add ``scale * B @ A`` to the weight of every linear layer that ``factors`` has a LoRA for."""
    modules = dict(language_model.named_modules())
    pairs = sorted({k.rsplit(".lora_", 1)[0] for k in factors})
    for path in pairs:
        a = factors[f"{path}.lora_A.default.weight"]
        b = factors[f"{path}.lora_B.default.weight"]
        linear = modules.get(path)
        if not isinstance(linear, torch.nn.Linear) or tuple(linear.weight.shape) != (b.shape[0], a.shape[1]):
            raise InputError(f"the LoRA for {path!r} does not fit the language model; was it trained for another one?")
        with torch.no_grad():
            linear.weight += scale * (b.float() @ a.float()).to(linear.weight.dtype)


def load_trained_mini_llava(
    weights: Optional[str | Path] = None, image_size: int = 224, attn_implementation: str = "sdpa"
) -> tuple[Any, Any]:
    """mini-llava with its trained projector and LoRA (``weights``, default :data:`TRAINED`).

    Parameters
    ----------
    weights : str, pathlib.Path or None
        The file ``train.py`` wrote.
    image_size : int
        The tower's input side (trained at 224; 336 gives 576 tokens through interpolated positions).
    attn_implementation : str
        ``"sdpa"`` or ``"eager"``.
    """
    from safetensors import safe_open

    path = Path(weights) if weights is not None else TRAINED
    if not path.is_file():
        raise InputError(
            f"no trained mini-llava weights at {str(path)!r}; train them with "
            "'python -m tokencomp.analysis.mini_llava.train --out DIR' and pass DIR/mini_llava.safetensors."
        )
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("feature_layer") != str(FEATURE_LAYER):
        raise InputError(
            f"{str(path)!r} was trained on the tower's hidden state {metadata.get('feature_layer', 'unknown')!r}; this "
            f"mini-llava reads vision_feature_layer={FEATURE_LAYER}. Retrain with this version's train.py, or use "
            "the version that wrote the file."
        )
    model, processor = load_mini_llava(image_size, attn_implementation=attn_implementation)
    projector = {k: v for k, v in tensors.items() if not k.startswith("lora.")}
    model.model.multi_modal_projector.load_state_dict(projector, strict=True)
    lora = {k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}
    if lora:
        merge_lora(model.model.language_model, lora, float(metadata["lora_alpha"]) / float(metadata["lora_rank"]))
    return model.eval(), processor
