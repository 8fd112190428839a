"""HFVisionTokens: tokens and [CLS] attention of tiny CLIP / SigLIP / DINOv2 / ViT towers saved to disk (offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_models import spread_weights
from tokencomp.analysis.features import HFVisionTokens, is_hf, square_image

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14
)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The towers are tiny: intra-op threads only add overhead (milliseconds per op on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(70, 90, 3), (56, 56, 3), (100, 64, 3)]]


def _tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision transformer of a full CLIP / SigLIP model, or the tower itself."""
    return getattr(model, "vision_model", model)


def _normalised(images, mean, std) -> torch.Tensor:
    x = torch.stack([square_image(img, 56) for img in images])
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _manual_cls_attention(layer_module, hidden_in: torch.Tensor, heads: int) -> torch.Tensor:
    """Head-mean softmax(q k^T / sqrt(d)) of the [CLS] query over the patch keys, renormalised."""
    h = layer_module.layer_norm1(hidden_in)
    attn = layer_module.self_attn
    b, n, d = h.shape
    q = attn.q_proj(h).view(b, n, heads, d // heads).transpose(1, 2)
    k = attn.k_proj(h).view(b, n, heads, d // heads).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)
    row = weights[:, :, 0, 1:].mean(1)
    return row / row.sum(-1, keepdim=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """In-memory reference models and the folders they were saved to."""
    from transformers import (
        BertConfig,
        BertModel,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        SiglipConfig,
        SiglipModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        ViTConfig,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    models = {
        "clip_vision": CLIPVisionModel._from_config(CLIPVisionConfig(**VISION), attn_implementation="eager"),
        "clip_full": CLIPModel._from_config(
            CLIPConfig(vision_config=VISION, text_config=TEXT), attn_implementation="eager"
        ),
        "siglip_vision": SiglipVisionModel(SiglipVisionConfig(**VISION)),
        "siglip_full": SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT)),
        # DINOv2 configured for 518 px (as the hub's checkpoints): the tokens come at the images' 56 px
        "dinov2": Dinov2Model._from_config(Dinov2Config(**{**VISION, "image_size": 518}), attn_implementation="eager"),
        "vit": ViTModel._from_config(ViTConfig(**VISION), add_pooling_layer=False, attn_implementation="eager"),
        "bert": BertModel(
            BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50)
        ),
    }
    out = {}
    for seed, (name, model) in enumerate(models.items()):
        spread_weights(model, seed=seed)
        model.save_pretrained(root / name)
        out[name] = (model, str(root / name))
    processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor.save_pretrained(root / "clip_full")
    processor.save_pretrained(root / "dinov2")  # DINOv2 takes its input side from the processor's crop
    bad = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    models["clip_vision"].save_pretrained(root / "clip_bad_processor")
    bad.save_pretrained(root / "clip_bad_processor")
    out["clip_bad_processor"] = (models["clip_vision"], str(root / "clip_bad_processor"))
    return out


def _reference_pixels(name, folder, images) -> torch.Tensor:
    """Pixel values computed by hand: the saved processor for ``clip_full``, else the fallback."""
    if name == "clip_full":
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    mean, std = (CLIP_MEAN, CLIP_STD) if name.startswith("clip") else ((0.5,) * 3, (0.5,) * 3)
    return _normalised(images, mean, std)


@pytest.mark.parametrize("name", ["clip_vision", "clip_full"])
def test_clip_tokens_are_layer_minus_2_without_cls(saved, name):
    model, folder = saved[name]
    images = _images()
    ext = HFVisionTokens(folder, batch_size=2)  # 3 images: chunks of 2 and 1
    tokens, attention = ext.encode(images)
    with torch.no_grad():
        ref = _tower(model)(pixel_values=_reference_pixels(name, folder, images), output_hidden_states=True)
    assert ext.family == "clip" and ext.layer == -2 and ext.grid == (4, 4) and ext.dim == 32 and ext.head is None
    assert tokens.shape == (3, 16, 32) and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, ref.hidden_states[-2][:, 1:])
    torch.testing.assert_close(ext(images), tokens, rtol=0, atol=0)
    assert attention.shape == (3, 16)


@pytest.mark.parametrize("layer", [-2, -1, 1, 2])
def test_clip_cls_attention_is_the_producing_layers_cls_row(saved, layer):
    model, folder = saved["clip_vision"]
    images = _images()
    ext = HFVisionTokens(folder, layer=layer, batch_size=2)
    tokens, attention = ext.encode(images)
    with torch.no_grad():
        ref = model(
            pixel_values=_reference_pixels("clip_vision", folder, images),
            output_hidden_states=True,
            output_attentions=True,
        )
        index = layer % 3  # 3 hidden states; hidden_states[index] is the output of layer index - 1
        manual = _manual_cls_attention(model.encoder.layers[index - 1], ref.hidden_states[index - 1], heads=2)
    row = ref.attentions[index - 1][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(attention, row / row.sum(-1, keepdim=True))
    torch.testing.assert_close(attention, manual)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3))
    torch.testing.assert_close(tokens, ref.hidden_states[index][:, 1:])
    # the two layers attend differently, so an off-by-one index would show
    other = ref.attentions[index % 2][:, :, 0, 1:].mean(1)
    assert not torch.allclose(attention, other / other.sum(-1, keepdim=True), atol=1e-3)


@pytest.mark.parametrize("name", ["siglip_vision", "siglip_full"])
def test_siglip_tokens_are_last_hidden_state_and_no_cls(saved, name):
    model, folder = saved[name]
    images = _images()
    ext = HFVisionTokens(folder, batch_size=2)
    tokens, attention = ext.encode(images)
    with torch.no_grad():
        ref = _tower(model)(pixel_values=_reference_pixels(name, folder, images), output_hidden_states=True)
    assert ext.family == "siglip" and ext.layer == -1 and ext.grid == (4, 4) and attention is None
    assert tokens.shape == (3, 16, 32)
    torch.testing.assert_close(tokens, ref.hidden_states[-1])
    zero = HFVisionTokens(folder, layer=0)  # the embedding output: fine without a [CLS] attention
    torch.testing.assert_close(zero(images), ref.hidden_states[0])


@pytest.mark.parametrize("name", ["dinov2", "vit"])
def test_dinov2_and_vit_tokens_are_the_last_layer_without_cls_and_their_cls_row(saved, name):
    model, folder = saved[name]
    images = _images()
    ext = HFVisionTokens(folder, batch_size=2)
    tokens, attention = ext.encode(images)
    if name == "dinov2":
        from transformers import CLIPImageProcessor

        pixels = CLIPImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    else:
        pixels = _normalised(images, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        ref = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    assert ext.family == name and ext.layer == -1 and ext.image_size == 56 and ext.grid == (4, 4)
    assert tokens.shape == (3, 16, 32) and attention.shape == (3, 16)
    torch.testing.assert_close(tokens, ref.hidden_states[-1][:, 1:])
    row = ref.attentions[-1][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(attention, row / row.sum(-1, keepdim=True))
    other = ref.attentions[0][:, :, 0, 1:].mean(1)  # the first layer attends differently
    assert not torch.allclose(attention, other / other.sum(-1, keepdim=True), atol=1e-3)


def test_fallback_preprocessing_is_square_image_and_family_normalisation(saved):
    clip = HFVisionTokens(saved["clip_vision"][1])
    siglip = HFVisionTokens(saved["siglip_vision"][1])
    assert clip.processor is None and siglip.processor is None
    images = _images()
    torch.testing.assert_close(clip.preprocess(images), _normalised(images, CLIP_MEAN, CLIP_STD), rtol=0, atol=0)
    x = torch.stack([square_image(img, 56) for img in images])
    torch.testing.assert_close(siglip.preprocess(images), 2 * x - 1, rtol=0, atol=1e-6)
    white = [np.full((30, 40, 3), 255, dtype=np.uint8)]
    expected = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])  # 1.9303, 2.0749, 2.1459
    torch.testing.assert_close(clip.preprocess(white)[0, :, 7, 9], expected)
    torch.testing.assert_close(siglip.preprocess(white), torch.ones(1, 3, 56, 56))


def test_saved_processor_is_used(saved):
    model, folder = saved["clip_full"]
    from transformers import CLIPImageProcessor

    ext = HFVisionTokens(folder)
    assert ext.processor is not None
    images = _images()
    by_hand = CLIPImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ext.preprocess(images), by_hand, rtol=0, atol=0)
    # shortest-edge resize + bicubic crop differs from the fallback's square_image, so the path matters
    assert not torch.allclose(by_hand, _normalised(images, CLIP_MEAN, CLIP_STD), atol=1e-2)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=by_hand, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(ext(images), ref)


def test_processor_of_the_wrong_size_raises(saved):
    ext = HFVisionTokens(saved["clip_bad_processor"][1])
    with pytest.raises(ValueError, match=r"\(3, 28, 28\).*\(3, 56, 56\)"):
        ext.encode(_images())


def test_errors(saved):
    with pytest.raises(
        ValueError,
        match=r"'bert'.*allowed model types: clip, clip_vision_model, siglip, "
        r"siglip_vision_model, dinov2, vit",
    ):
        HFVisionTokens(saved["bert"][1])
    folder = saved["clip_vision"][1]
    for layer in (3, -4, 1.0, True):
        with pytest.raises(ValueError, match=r"layer=.*3 hidden states.*\[-3, 2\]"):
            HFVisionTokens(folder, layer=layer)
    for layer in (0, -3):
        with pytest.raises(ValueError, match=r"embedding output.*\[1, 2\] or \[-2, -1\]"):
            HFVisionTokens(folder, layer=layer)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1; got 0"):
        HFVisionTokens(folder, batch_size=0)
    with pytest.raises(ValueError, match=r"empty list of images"):
        HFVisionTokens(folder).encode([])


def test_is_hf():
    assert is_hf("hf:openai/clip-vit-large-patch14-336") and is_hf("hf:/data/ckpt")
    assert not is_hf("efficientnet") and not is_hf("pixels") and not is_hf("openai/hf:clip")


def test_builtin_dinov2_features_are_the_pretrained_towers_last_layer_at_336():
    """``--features dinov2``: mini-llava's pretrained DINOv2 at 336 px, 576 x 384 tokens, the real [CLS] row."""
    from tokencomp.analysis.features import DINOV2_SIZE, dinov2_tokens
    from tokencomp.analysis.mini_llava.dinov2 import IMAGENET_MEAN, IMAGENET_STD
    from tokencomp.errors import WeightsUnavailableError

    try:
        ext = dinov2_tokens()
    except WeightsUnavailableError as error:
        pytest.skip(f"the pretrained DINOv2 cannot be obtained here: {error}")
    images = _images()[:2]
    tokens, attention = ext.encode(images)
    assert DINOV2_SIZE == 336 and ext.grid == (24, 24) and tokens.shape == (2, 576, 384)
    x = torch.stack([square_image(img, 336) for img in images])
    pixels = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        ref = ext.model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(tokens, ref.hidden_states[12][:, 1:])
    row = ref.attentions[11][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(attention, row / row.sum(-1, keepdim=True))
