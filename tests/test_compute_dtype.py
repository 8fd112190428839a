"""``compute_dtype``: "input" reproduces the authors' half-precision arithmetic, "float32" their float32 one.

Each strategy is compared with a literal re-statement of its authors' code (``reference_precision.py``) on
random inputs of LLaVA-1.5 shapes (576 image tokens, 16 vision heads, a 32-head LLaMA layer) in float16 and
bfloat16. ``python tests/test_compute_dtype.py`` prints how many kept tokens each choice shares with the
authors' float16 arithmetic.
"""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from reference_precision import authors_fastv, authors_pdrop_row, authors_vispruner, eager_attention_weights
from tokencomp.errors import InvalidParameterError

HALF = [torch.float16, torch.bfloat16]
STRATEGIES = ["vispruner", "pdrop", "fastv"]
# a LLaVA-1.5 prompt: system tokens, the image, the instruction (LLaMA-7B: 32 heads of 128 channels)
SYS, IMAGE, TEXT, HEADS, HEAD_DIM = 35, 576, 40, 32, 128


def vision_inputs(b: int, n: int, d: int, heads: int, seed: int, dtype: torch.dtype):
    """Vision-tower outputs in ``dtype``: tokens ``[B, N, D]`` of varied norms and per-head [CLS]
    attentions ``[B, H, N]`` (softmax rows with a heavy upper tail, cast to ``dtype`` as a half-precision
    attention layer returns them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g) * (0.5 + torch.rand(b, n, 1, generator=g) * 2)
    attn = (torch.randn(b, heads, n, generator=g) * 1.5).softmax(dim=-1)
    return x.to(dtype), attn.to(dtype)


def cls_context(attn: torch.Tensor) -> tc.Context:
    """The context the integrations build: the float32 mean over heads of the tower's attention weights."""
    return tc.Context(cls_attention=attn.float().mean(dim=1))


def kept(mask: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in mask]


# ---------------------------------------------------------------------------------------------- VisPruner
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("seed,d,k,ratio", [(0, 1024, 64, 0.5), (1, 256, 128, 0.5), (2, 256, 64, 0.75)])
def test_vispruner_input_equals_authors_half(dtype, seed, d, k, ratio):
    x, attn = vision_inputs(2, 576, d, 16, seed, dtype)
    result = tc.create("vispruner", important_ratio=ratio, compute_dtype="input").compress(x, k, cls_context(attn))
    assert result.indices.tolist() == kept(authors_vispruner(x, attn, k, ratio))


@pytest.mark.parametrize("cache", ["auto", "never"])
@pytest.mark.parametrize("seed", range(2))
def test_vispruner_float32_equals_authors_float32(seed, cache):
    x, attn = vision_inputs(2, 576, 256, 16, seed, torch.float16)
    result = tc.create("vispruner", cache=cache).compress(x, 64, cls_context(attn))
    assert result.indices.tolist() == kept(authors_vispruner(x.float(), attn.float(), 64))


def test_vispruner_input_on_float32_tokens_is_float32():
    x, attn = vision_inputs(2, 576, 64, 16, 3, torch.float32)
    context = cls_context(attn)
    a = tc.create("vispruner", compute_dtype="input").compress(x, 64, context)
    b = tc.create("vispruner").compress(x, 64, context)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens)


# ---------------------------------------------------------------------------------------------- PyramidDrop
def llm_inputs(b: int, seed: int, dtype: torch.dtype, length: int = SYS + IMAGE + TEXT):
    """A layer's rotated queries and keys ``[B, H, L, Dh]`` in ``dtype`` (logits of standard deviation ~2)."""
    g = torch.Generator().manual_seed(100 + seed)
    query = torch.randn(b, HEADS, length, HEAD_DIM, generator=g) * 2**0.5
    keys = torch.randn(b, HEADS, length, HEAD_DIM, generator=g) * 2**0.5
    return query.to(dtype), keys.to(dtype)


def pdrop_context(query, keys, key_mask=None) -> tc.Context:
    """What the integration gives PyramidDrop at a boundary: the last token's query and every key."""
    b = query.shape[0]
    visual = (SYS + torch.arange(IMAGE)).expand(b, IMAGE).contiguous()
    return tc.Context(query=query[:, :, -1], keys=keys, visual_positions=visual, key_mask=key_mask)


def pdrop_kept(query, keys, k, key_mask=None):
    length = query.shape[2]
    rows = authors_pdrop_row(query, keys, length, SYS, IMAGE, k, key_mask)
    return [(row - SYS).tolist() for row in rows]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("seed,k", [(0, 288), (1, 144), (2, 72)])
def test_pdrop_input_equals_authors_half(dtype, seed, k):
    query, keys = llm_inputs(2, seed, dtype)
    tokens = torch.randn(2, IMAGE, 64).to(dtype)
    mask = torch.ones(2, query.shape[2], dtype=torch.bool)
    mask[1, :3] = False  # a left-padded row
    result = tc.create("pdrop", compute_dtype="input").compress(tokens, k, pdrop_context(query, keys, mask))
    want = pdrop_kept(query, keys, k, mask)
    assert result.indices.tolist() == want
    assert result.info["scores"].dtype == dtype
    # the integration hands over float32 copies of the model's projections: the same arithmetic
    context = pdrop_context(query.float(), keys.float(), mask)
    assert tc.create("pdrop", compute_dtype="input").compress(tokens, k, context).indices.tolist() == want


@pytest.mark.parametrize("seed", range(2))
def test_pdrop_float32_equals_authors_float32(seed):
    query, keys = llm_inputs(2, seed, torch.float16)
    tokens = torch.randn(2, IMAGE, 64).half()
    result = tc.create("pdrop").compress(tokens, 288, pdrop_context(query, keys))
    assert result.indices.tolist() == pdrop_kept(query.float(), keys.float(), 288)


# ---------------------------------------------------------------------------------------------- FastV
def fastv_case(seed: int, dtype: torch.dtype):
    """Eager attention weights ``[B, H, L, L]`` of layer ``K - 1`` in ``dtype`` and the context the
    integration builds from them (the float32 head mean of the last row, at the image tokens)."""
    query, keys = llm_inputs(2, seed, dtype)
    weights = eager_attention_weights(query, keys)
    row = weights[:, :, -1:, :].float().mean(dim=1)[:, -1]
    return weights, tc.Context(text_attention=row[:, SYS : SYS + IMAGE])


def fastv_kept(weights, k):
    return [(authors_fastv(weights[i : i + 1], SYS, IMAGE, k) - SYS).tolist() for i in range(weights.shape[0])]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("seed,k", [(0, 288), (1, 144), (2, 64)])
def test_fastv_input_equals_authors_half(dtype, seed, k):
    weights, context = fastv_case(seed, dtype)
    tokens = torch.randn(2, IMAGE, 64).to(dtype)
    result = tc.create("fastv", compute_dtype="input").compress(tokens, k, context)
    assert result.indices.tolist() == fastv_kept(weights, k)


@pytest.mark.parametrize("seed", range(2))
def test_fastv_float32_equals_authors_float32(seed):
    weights, context = fastv_case(seed, torch.float16)
    tokens = torch.randn(2, IMAGE, 64).half()
    result = tc.create("fastv").compress(tokens, 288, context)
    assert result.indices.tolist() == fastv_kept(weights.float(), 288)


# ---------------------------------------------------------------------------------------------- parameter
@pytest.mark.parametrize("name", STRATEGIES)
def test_compute_dtype_default_and_round_trip(name):
    assert tc.create(name).get_params()["compute_dtype"] == "float32"
    comp = tc.create(name, compute_dtype="input")
    assert tc.create(name, **comp.get_params()).get_params()["compute_dtype"] == "input"


@pytest.mark.parametrize("bad", ["float16", "fp16", "Input", torch.float16, None, 32])
@pytest.mark.parametrize("name", STRATEGIES)
def test_compute_dtype_bad_value_rejected(name, bad):
    with pytest.raises(InvalidParameterError) as err:
        tc.create(name, compute_dtype=bad)
    message = str(err.value)
    assert "compute_dtype" in message and "'float32', 'input'" in message and repr(bad) in message
    assert "the inputs' own dtype" in message


# ---------------------------------------------------------------------------------------------- agreement
def _overlap(a: list[int], b: list[int]) -> int:
    return len(set(a) & set(b))


def agreement(seeds: int = 4) -> list[tuple[str, str, float, float, int]]:
    """Per strategy and half dtype: mean kept tokens in common with the authors' arithmetic in that dtype,
    for ``"input"`` and ``"float32"``, and the budget."""
    rows = []
    for dtype in HALF:
        name = str(dtype).removeprefix("torch.")
        same_in, same_32 = [], []
        for seed in range(seeds):
            x, attn = vision_inputs(2, 576, 1024, 16, seed, dtype)
            want = kept(authors_vispruner(x, attn, 64))
            for choice, out in (("input", same_in), ("float32", same_32)):
                got = tc.create("vispruner", compute_dtype=choice).compress(x, 64, cls_context(attn)).indices
                out += [_overlap(g, w) for g, w in zip(got.tolist(), want)]
        rows.append(("vispruner", name, sum(same_in) / len(same_in), sum(same_32) / len(same_32), 64))
    return rows


if __name__ == "__main__":
    print(
        f"{'strategy':<10} {'dtype':<9} {'input':>7} {'float32':>8}  (kept tokens shared with the authors' arithmetic)"
    )
    for strategy, dtype_name, same_in, same_32, k in agreement():
        print(f"{strategy:<10} {dtype_name:<9} {same_in:>5.1f}/{k} {same_32:>5.1f}/{k}")
