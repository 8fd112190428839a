"""The sequence the language model receives is the strategy's output order (``output_order``).

Inside a tiny LLaVA, the first decoder layer's image tokens are VisionZip's and PruMerge's outputs in
the authors' order (re-stated in ``reference_visionzip.py`` / ``reference_prumerge.py`` from the inputs
the integration gave the strategy); inside a tiny Qwen2-VL, whose tower has no [CLS] token for them, a
strategy in its own order fills the kept placeholders in that order, each token with its own M-RoPE
position.
"""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from reference_prumerge import literal_prumerge
from reference_visionzip import literal_visionzip
from tiny_models import llava_prompt, pre_hooks, qwen_prompt, tiny_llava, tiny_qwen2_vl
from tokencomp.strategies.visionzip import default_contextual


def recording(compressor: tc.Compressor) -> list:
    """Record every ``(tokens, budget, context, result)`` of ``compressor.compress``."""
    calls: list = []
    original = compressor.compress

    def compress(tokens, budget, context=None):
        result = original(tokens, budget, context)
        calls.append((tokens, budget, context, result))
        return result

    compressor.compress = compress  # type: ignore[method-assign]
    return calls


def first_layer_inputs(model, run) -> dict:
    """The first decoder layer's ``hidden_states`` and the language model's ``position_ids`` in the first
    forward of ``run()``."""
    seen: dict = {}

    def hidden(module, args, kwargs):
        seen.setdefault("hidden", (args[0] if args else kwargs["hidden_states"]).detach().clone())

    def positions(module, args, kwargs):
        seen.setdefault("positions", kwargs.get("position_ids"))

    lm = model.model.language_model
    with pre_hooks((lm.layers[0], hidden), (lm, positions)), torch.no_grad():
        run()
    return seen


def literal(name: str, params: dict, tokens: torch.Tensor, attn: torch.Tensor, k: int):
    """The authors' (positions, tokens) for one image, re-stated literally."""
    if name == "visionzip":
        c = default_contextual(k)
        positions, values, _ = literal_visionzip(tokens, attn, k - c, c)
    else:
        positions, values, _, _ = literal_prumerge(tokens, attn, k, **params)
    return positions, values


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(attn_implementation="eager")


@pytest.mark.parametrize(
    "name,params,budget",
    [("visionzip", {}, 12), ("prumerge", {"knn": 4}, 9), ("prumerge", {"knn": 4, "plus": True}, 9)],
)
def test_llava_first_layer_receives_the_authors_order(llava, name, params, budget):
    inputs = llava_prompt(llava, batch=2, seed=3)
    compressor = tc.create(name, **params)
    calls = recording(compressor)
    with tc.apply(llava, compressor, budget=budget, point="post_projector"):
        seen = first_layer_inputs(llava, lambda: llava(**inputs))
    (tokens, _, context, result) = calls[0]
    start = int((inputs["input_ids"][0] == llava.config.image_token_id).nonzero()[0])
    image = seen["hidden"][:, start : start + budget]
    for b in range(2):
        positions, values = literal(name, params, tokens[b], context.cls_attention[b], budget)
        assert positions != sorted(positions)  # the check below tells the two orders apart
        assert result.indices[b].tolist() == positions
        torch.testing.assert_close(image[b], values.to(image.dtype), rtol=1e-5, atol=1e-5)


def test_llava_position_order_interleaves(llava):
    inputs = llava_prompt(llava, seed=3)
    compressor = tc.create("visionzip", order="position")
    calls = recording(compressor)
    with tc.apply(llava, compressor, budget=12, point="post_projector"):
        seen = first_layer_inputs(llava, lambda: llava(**inputs))
    result = calls[0][3]
    assert result.indices[0].tolist() == sorted(result.indices[0].tolist())
    start = int((inputs["input_ids"][0] == llava.config.image_token_id).nonzero()[0])
    torch.testing.assert_close(seen["hidden"][0, start : start + 12], result.tokens[0])


class Reversed(tc.Compressor):
    """Every ``stride``-th token, fed to the model last position first (an order of its own)."""

    output_order = "strategy"
    deterministic = True

    def _compress(self, tokens, k, context):
        kept = torch.arange(k, device=tokens.device).flip(0).expand(tokens.shape[0], k)
        return tc.selection_result(tokens, kept * (tokens.shape[1] // k))


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_vl()


def test_qwen_tokens_in_strategy_order_keep_their_own_positions(qwen):
    sizes = [(8, 12), (8, 8)]  # 24 and 16 merged tokens
    inputs = qwen_prompt(sizes, batch=2, pad=[0, 3], seed=1)
    image = qwen.config.image_token_id
    with torch.no_grad():
        rope, _ = qwen.model.get_rope_index(
            inputs["input_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        features = qwen.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    features = features.pooler_output
    compressor = Reversed()
    calls = recording(compressor)
    with tc.apply(qwen, compressor, budget=4):
        seen = first_layer_inputs(qwen, lambda: qwen(**inputs))
    hidden, positions = seen["hidden"], seen["positions"]
    for b in range(2):
        columns = (inputs["input_ids"][b] == image).nonzero().flatten()  # this row's placeholders, both images
        items = [(2 * b, columns[:24]), (2 * b + 1, columns[24:])]
        keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
        keep[columns] = False
        for item, cols in items:
            keep[cols[calls[item][3].indices]] = True
        short = torch.cumsum(keep.long(), 0) - 1  # each kept column's place in the shorter prompt
        for item, cols in items:
            kept = calls[item][3].indices  # [4] (one unbatched call per image), in sequence order
            assert kept.tolist() == sorted(kept.tolist(), reverse=True)
            slots = short[cols[kept.sort().values]]  # the image's kept slots, in prompt order
            torch.testing.assert_close(hidden[b, slots], features[item][kept].to(hidden.dtype))
            # M-RoPE rows 1-3 (temporal, height, width): each token's own original position
            assert torch.equal(positions[1:, b, slots], rope[:, b, cols[kept]])
