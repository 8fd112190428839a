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
from reference_precision import (
    authors_fastv,
    authors_pdrop_row,
    authors_visionzip,
    authors_vispruner,
    eager_attention_weights,
)
from tokencomp.errors import InvalidParameterError

HALF = [torch.float16, torch.bfloat16]
STRATEGIES = ["vispruner", "visionzip", "pdrop", "fastv"]
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


# ---------------------------------------------------------------------------------------------- VisionZip
def visionzip_outcome(result, b: int):
    """Row ``b`` of a VisionZip result, whatever its output order: the dominant positions, the targets'
    positions, the target of every other token (by position) and each target's contextual token."""
    indices = result.indices[b]
    dominant = sorted(indices[result.info["dominant"][b]].tolist())
    targets = sorted(indices[~result.info["dominant"][b]].tolist())
    owner = indices[result.assignment[b]]  # position of the output that represents each input
    others = [p for p in range(owner.shape[0]) if p not in set(dominant) | set(targets)]
    contextual = {t: result.tokens[b, int((indices == t).nonzero())] for t in targets}
    return dominant, targets, owner[others].tolist(), contextual


def authors_visionzip_outcome(x, attn, dominant, contextual, b: int):
    dom_mask, targets, match, tokens = authors_visionzip(x[b : b + 1], attn[b : b + 1], dominant, contextual)
    targets = targets[0].tolist()
    owner = [targets[j] for j in match[0].tolist()]
    return dom_mask[0].nonzero().flatten().tolist(), targets, owner, dict(zip(targets, tokens[0]))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("seed,d,k", [(0, 1024, 64), (1, 256, 128), (2, 256, 192)])
def test_visionzip_input_equals_authors_half(dtype, seed, d, k):
    x, attn = vision_inputs(2, 576, d, 16, seed, dtype)
    c = (5 * k + 16) // 32  # the authors' 10 / 20 / 30
    result = tc.create("visionzip", compute_dtype="input").compress(x, k, cls_context(attn))
    for b in range(2):
        dominant, targets, owner, contextual = visionzip_outcome(result, b)
        want_dominant, want_targets, want_owner, want_contextual = authors_visionzip_outcome(x, attn, k - c, c, b)
        assert (dominant, targets, owner) == (want_dominant, want_targets, want_owner)
        # bit for bit: the authors' bmm of the one-hot assignment sums in float32 and rounds once, as ours (in
        # another order, which a rounding to half precision has hidden on every input tried here)
        assert all(torch.equal(contextual[t], want_contextual[t]) for t in targets)


@pytest.mark.parametrize("seed", range(2))
def test_visionzip_float32_equals_authors_float32(seed):
    x, attn = vision_inputs(2, 576, 256, 16, seed, torch.float16)
    result = tc.create("visionzip").compress(x, 64, cls_context(attn))
    for b in range(2):
        dominant, targets, owner, contextual = visionzip_outcome(result, b)
        want_dominant, want_targets, want_owner, want_contextual = authors_visionzip_outcome(
            x.float(), attn.float(), 54, 10, b
        )
        assert (dominant, targets, owner) == (want_dominant, want_targets, want_owner)
        for t in targets:
            torch.testing.assert_close(contextual[t].float(), want_contextual[t].half().float())


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


# ---------------------------------------------------------------------------------------------- in the LLM
@pytest.fixture(scope="module")
def bf16_llava():
    from tiny_models import tiny_llava

    return tiny_llava(attn_implementation="eager").to(torch.bfloat16)


def _recording(comp):
    """``comp`` with every ``(tokens, context, result)`` its stages see kept in ``comp.seen``."""
    inner = comp._compress
    comp.seen = []

    def record(tokens, k, context):
        result = inner(tokens, k, context)
        comp.seen.append((tokens, context, result))
        return result

    comp._compress = record
    return comp


def test_fastv_input_in_a_bfloat16_model_keeps_the_authors_tokens(bf16_llava):
    from tiny_models import llava_prompt

    inputs = llava_prompt(bf16_llava, seed=10)
    comp = _recording(tc.create("fastv", compute_dtype="input"))
    with torch.no_grad():
        full = bf16_llava(**inputs, output_attentions=True)
        with tc.apply(bf16_llava, comp, budget=12):
            bf16_llava(**inputs)
    tokens, context, result = comp.seen[0]
    assert tokens.dtype == torch.bfloat16 and result.info["scores"].dtype == torch.bfloat16
    start = int((inputs["input_ids"][0] == 119).nonzero()[0])
    want = authors_fastv(full.attentions[1], start, tokens.shape[1], 12) - start
    assert result.indices[0].tolist() == want.tolist()


def test_pdrop_input_in_a_bfloat16_model_computes_in_bfloat16(bf16_llava):
    from tiny_models import llava_prompt

    inputs = llava_prompt(bf16_llava, seed=12)
    comp = _recording(tc.create("pdrop", layers=[1, 2], compute_dtype="input"))
    with torch.no_grad(), tc.apply(bf16_llava, comp):
        bf16_llava(**inputs)
    assert len(comp.seen) == 2
    for tokens, context, result in comp.seen:
        # the integration's float32 query and keys hold bfloat16 values: casting back is exact
        assert torch.equal(context.keys.to(torch.bfloat16).float(), context.keys)
        assert torch.equal(context.query.to(torch.bfloat16).float(), context.query)
        assert tokens.dtype == torch.bfloat16 and result.info["scores"].dtype == torch.bfloat16
        length = context.keys.shape[2]
        positions = context.visual_positions[0]
        start, n = int(positions[0]), positions.shape[0]
        assert positions.tolist() == list(range(start, start + n))
        q = context.query.to(torch.bfloat16)[:, :, None].expand(-1, -1, length, -1)  # the last row is used
        want = authors_pdrop_row(q, context.keys.to(torch.bfloat16), length, start, n, result.indices.shape[1])
        assert result.indices[0].tolist() == (want[0] - start).tolist()


# ---------------------------------------------------------------------------------------------- parameter
def test_strategies_with_compute_dtype():
    assert sorted(n for n in tc.available() if "compute_dtype" in tc.get(n).parameter_constraints) == sorted(STRATEGIES)


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
def _kept_pairs(name: str, dtype: torch.dtype, seed: int):
    """``(ours(compute_dtype) -> [B][K] kept positions, the authors' [B][K] in dtype, K)`` for one input."""
    if name in ("vispruner", "visionzip"):
        x, attn = vision_inputs(2, 576, 1024, 16, seed, dtype)
        if name == "vispruner":
            want = kept(authors_vispruner(x, attn, 64))
        else:
            want = [
                sorted(
                    authors_visionzip_outcome(x, attn, 54, 10, b)[0] + authors_visionzip_outcome(x, attn, 54, 10, b)[1]
                )
                for b in range(2)
            ]
        return (lambda choice: tc.create(name, compute_dtype=choice).compress(x, 64, cls_context(attn))), want, 64
    tokens = torch.randn(2, IMAGE, 64).to(dtype)
    if name == "pdrop":
        query, keys = llm_inputs(2, seed, dtype)
        context, want = pdrop_context(query.float(), keys.float()), pdrop_kept(query, keys, 288)
    else:
        weights, context = fastv_case(seed, dtype)
        want = fastv_kept(weights, 288)
    return (lambda choice: tc.create(name, compute_dtype=choice).compress(tokens, 288, context)), want, 288


def agreement(seeds: int = 4) -> list[tuple[str, str, float, float, int]]:
    """Per strategy and half dtype: the mean number of kept tokens in common with the authors' arithmetic in
    that dtype, for ``"input"`` and ``"float32"``, and the budget (LLaVA-1.5 shapes, ``seeds`` inputs of 2)."""
    rows = []
    for name in STRATEGIES:
        for dtype in HALF:
            same: dict[str, list[int]] = {"input": [], "float32": []}
            for seed in range(seeds):
                run, want, k = _kept_pairs(name, dtype, seed)
                for choice, out in same.items():
                    got = sorted_rows(run(choice).indices)
                    out += [len(set(g) & set(w)) for g, w in zip(got, want)]
            mean = {c: sum(v) / len(v) for c, v in same.items()}
            rows.append((name, str(dtype).removeprefix("torch."), mean["input"], mean["float32"], k))
    return rows


def sorted_rows(indices: torch.Tensor) -> list[list[int]]:
    return indices.sort(dim=-1).values.tolist()


def test_agreement_table_runs():
    """``compute_dtype="input"`` keeps exactly the authors' tokens on every input of the table."""
    for _, _, same_input, _, k in agreement(seeds=1):
        assert same_input == k


def visionzip_assignment(seeds: int = 4) -> list[tuple[str, float, float]]:
    """Per half dtype: the share of VisionZip's merged tokens given the authors' target, "input" and "float32"."""
    rows = []
    for dtype in HALF:
        same: dict[str, list[float]] = {"input": [], "float32": []}
        for seed in range(seeds):
            x, attn = vision_inputs(2, 576, 1024, 16, seed, dtype)
            for choice, out in same.items():
                result = tc.create("visionzip", compute_dtype=choice).compress(x, 64, cls_context(attn))
                for b in range(2):
                    want = authors_visionzip_outcome(x, attn, 54, 10, b)
                    got = visionzip_outcome(result, b)
                    owner = dict(zip(range(576), [-1] * 576))
                    owner.update(zip([p for p in range(576) if p not in set(got[0]) | set(got[1])], got[2]))
                    others = [p for p in range(576) if p not in set(want[0]) | set(want[1])]
                    out.append(sum(owner[p] == o for p, o in zip(others, want[2])) / len(others))
        rows.append((str(dtype).removeprefix("torch."), *(sum(v) / len(v) for v in same.values())))
    return rows


if __name__ == "__main__":
    print(
        f"{'strategy':<10} {'dtype':<9} {'input':>8} {'float32':>9}  (kept tokens shared with the authors' arithmetic)"
    )
    for strategy, dtype_name, same_in, same_32, k in agreement():
        print(f"{strategy:<10} {dtype_name:<9} {same_in:>4.1f}/{k:<3} {same_32:>5.1f}/{k:<3}")
    print("\nvisionzip: merged tokens given the authors' target (input, float32)")
    for dtype_name, same_in, same_32 in visionzip_assignment():
        print(f"{dtype_name:<9} {same_in:>7.1%} {same_32:>8.1%}")
