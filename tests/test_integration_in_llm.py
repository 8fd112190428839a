"""In-LLM stages through tc.apply on a tiny random LLaVA: cuts, cache correctness, schedules, eager needs."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from tiny_models import llava_prompt, pre_hooks, tiny_llava
from tokencomp.errors import InputError

N = 36
IMAGE = 119


@pytest.fixture(scope="module")
def eager():
    return tiny_llava(attn_implementation="eager")


@pytest.fixture(scope="module")
def sdpa():
    return tiny_llava(attn_implementation="sdpa")


def layer_lengths(model, run):
    seen = []
    spies = [
        (layer, lambda m, a, kw, i=i: seen.append((i, (a[0] if a else kw["hidden_states"]).shape[1])))
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    with pre_hooks(*spies), torch.no_grad():
        out = run()
    return out, seen


def greedy(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, do_sample=False, suppress_tokens=[IMAGE], **kw)


class Replay(tc.Compressor):
    """Runs ``inner`` on its first call per stage and replays that result afterwards (text-free)."""

    stage = "in_llm"
    deterministic = True

    def __init__(self, inner):
        self.inner = inner
        self.requires = inner.requires
        self.carries = inner.carries
        self.in_llm_positions = inner.in_llm_positions
        self.picks = []
        self.calls = 0

    def llm_layers(self):
        return self.inner.llm_layers()

    def stage_budgets(self, n):
        return self.inner.stage_budgets(n)

    def sets_own_budgets(self):
        return self.inner.sets_own_budgets()

    def _compress(self, tokens, k, context):
        # The visual tokens precede every generated token, so causality makes their hidden states the
        # same in every recomputation: the prefill's whole result (merged values included) replays exactly.
        stages = len(self.inner.llm_layers())
        if len(self.picks) < stages:
            self.picks.append(self.inner.compress(tokens, k, context))
        result = self.picks[self.calls % stages]
        self.calls += 1
        torch.testing.assert_close(result.tokens[:, :0], tokens[:, :0])  # same batch and width
        return result


@pytest.mark.parametrize(
    "strategy,budget,params,cut",
    [
        ("fastv", 12, {}, 2),
        ("dart-llm", 12, {}, 2),
        ("apet-llm", 16, {"layer": 3}, 3),
        ("pdrop", None, {"layers": [1, 2, 3]}, 1),
    ],
)
def test_layers_see_the_cut(eager, strategy, budget, params, cut):
    inputs = llava_prompt(eager, batch=2, pad=[0, 3])
    length = inputs["input_ids"].shape[1]
    with tc.apply(eager, strategy, budget=budget, **params) as handle:
        _, seen = layer_lengths(eager, lambda: eager(**inputs))
    lengths = dict(seen)
    assert all(lengths[i] == length for i in range(cut))
    if strategy == "pdrop":  # 36 -> 18 -> 9 -> 4 image tokens per row at layers 1, 2, 3
        assert [lengths[1], lengths[2], lengths[3]] == [length - 18, length - 27, length - 32]
        assert [(s["tokens_in"], s["tokens_out"]) for s in handle.stats] == [(72, 36), (36, 18), (18, 8)]
    else:
        assert all(lengths[i] == length - (N - budget) for i in range(cut, 4))
        assert (handle.stats[0]["tokens_in"], handle.stats[0]["tokens_out"]) == (72, 2 * budget)


@pytest.mark.parametrize(
    "strategy,budget,params", [("fastv", 12, {}), ("dart-llm", 10, {}), ("pdrop", None, {"layers": [1, 3]})]
)
def test_cached_decoding_equals_recomputation_with_the_same_picks(eager, strategy, budget, params):
    # Text-conditioned picks change when the whole sequence is recomputed with new tokens, so the
    # recomputation replays the prefill's picks: with them, cache and no cache must agree exactly.
    inputs = llava_prompt(eager, batch=2, pad=[2, 0], seed=3)
    replay = Replay(tc.create(strategy, **params))
    with tc.apply(eager, replay, budget=budget):
        cached = greedy(eager, inputs)
        recomputed = greedy(eager, inputs, use_cache=False)
    with tc.apply(eager, strategy, budget=budget, **params):
        plain = greedy(eager, inputs)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("schedule", [[("apet-llm", 16, {"layer": 2})], [("apet", 24), ("apet-llm", 14, {"layer": 2})]])
def test_apet_stage_two_and_the_two_stage_schedule_cache_equals_no_cache(eager, schedule):
    inputs = llava_prompt(eager, batch=2, pad=[0, 3], seed=4)
    with tc.apply(eager, schedule) as handle:
        cached, seen = layer_lengths(eager, lambda: greedy(eager, inputs))
        recomputed = greedy(eager, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)
    stages = {s["stage"]: (s["tokens_in"], s["tokens_out"]) for s in handle.stats}
    if len(schedule) == 2:
        assert stages["pre_llm"] == (72, 48) and stages["in_llm@2"] == (48, 28)
        length = inputs["input_ids"].shape[1]
        assert seen[0] == (0, length - 12) and seen[2] == (2, length - 22)  # 36 -> 24 per image, 24 -> 14


def test_renumbered_positions_are_contiguous(eager):
    inputs = llava_prompt(eager, seed=5)
    seen = {}

    def spy(module, args, kwargs):
        seen.setdefault("ids", kwargs["position_ids"])

    with torch.no_grad(), tc.apply(eager, "apet-llm", budget=16, layer=3):
        with pre_hooks((eager.model.language_model.layers[3], spy)):  # after ours
            eager(**inputs)
    assert seen["ids"].tolist() == [list(range(inputs["input_ids"].shape[1] - 20))]


@pytest.mark.parametrize(
    "strategy,budget,params", [("fastv", N, {}), ("dart-llm", N, {}), ("pdrop", None, {"layers": [1, 2], "ratio": 1.0})]
)
def test_full_budget_equals_uncompressed_logits(eager, strategy, budget, params):
    inputs = llava_prompt(eager, batch=2, pad=[3, 0], seed=6)
    with torch.no_grad():
        reference = eager(**inputs).logits
        with tc.apply(eager, strategy, budget=budget, **params):
            compressed = eager(**inputs).logits
    assert torch.equal(compressed, reference)


def test_remove_restores_exactly(eager):
    inputs = llava_prompt(eager, batch=2, seed=7)
    with torch.no_grad():
        before = eager(**inputs).logits
        handle = tc.apply(eager, [("apet", 20), ("fastv", 8)])
        eager(**inputs)
        handle.remove()
        after = eager(**inputs).logits
    assert torch.equal(before, after)
    assert all(not layer._forward_pre_hooks for layer in eager.model.language_model.layers)
    assert all(not layer.self_attn._forward_hooks for layer in eager.model.language_model.layers)


def test_attention_reading_stage_under_sdpa(sdpa, eager):
    inputs = llava_prompt(sdpa, seed=8)
    with tc.apply(sdpa, "fastv", budget=10):
        with pytest.raises(tc.errors.AttentionUnavailableError, match="allow_eager_fallback=True"):
            with torch.no_grad():
                sdpa(**inputs)
    with torch.no_grad():
        with tc.apply(eager, "fastv", budget=10):
            expected = eager(**inputs).logits
        with tc.apply(sdpa, "fastv", budget=10, allow_eager_fallback=True):
            fallback = sdpa(**inputs).logits
    torch.testing.assert_close(fallback, expected, rtol=1e-4, atol=1e-4)
    assert sdpa.model.language_model.config._attn_implementation == "sdpa"


def test_pdrop_needs_no_attention_weights_under_sdpa(sdpa, eager):
    inputs = llava_prompt(sdpa, batch=2, pad=[0, 2], seed=9)
    with torch.no_grad():
        with tc.apply(sdpa, "pdrop", layers=[1, 3]):
            fast = sdpa(**inputs).logits
        with tc.apply(eager, "pdrop", layers=[1, 3]):
            slow = eager(**inputs).logits
    # row 1's two left-pad positions hold garbage that differs between kernels; compare real tokens
    torch.testing.assert_close(fast[:, 2:], slow[:, 2:], rtol=1e-4, atol=1e-4)


def test_an_unregistered_in_llm_strategy_without_layers_is_refused(eager):
    class Nowhere(tc.Compressor):  # unregistered, so register's check never saw it
        stage, deterministic = "in_llm", True
        layer = 2  # an attribute tokencomp does not read: llm_layers() says where

        def _compress(self, tokens, k, context):
            return tc.selection_result(tokens, torch.arange(k).expand(tokens.shape[0], k))

    with pytest.raises(InputError, match=r"says at no decoder layer where it acts; override Nowhere.llm_layers\(\)"):
        tc.apply(eager, Nowhere(), budget=5)


def test_fastv_row_is_the_last_tokens_attention(eager):
    inputs = llava_prompt(eager, seed=10)
    captured = {}

    class Spy(tc.Compressor):
        stage, needs_attention, deterministic = "in_llm", True, True
        requires = ("text_attention", "visual_positions")

        def llm_layers(self):
            return (2,)

        def _compress(self, tokens, k, context):
            captured.update(row=context.text_attention, pos=context.visual_positions)
            return tc.selection_result(tokens, torch.arange(k).expand(tokens.shape[0], k))

    with torch.no_grad():
        full = eager(**inputs, output_attentions=True)
        with tc.apply(eager, Spy(), budget=5):
            eager(**inputs)
    start = int((inputs["input_ids"][0] == IMAGE).nonzero()[0])
    expected = full.attentions[1][:, :, -1, start : start + N].mean(dim=1)
    torch.testing.assert_close(captured["row"], expected)
    assert captured["pos"].tolist() == [list(range(start, start + N))]


def test_cross_attention_is_the_instruction_rows(eager):
    inputs = llava_prompt(eager, batch=2, pad=[0, 2], seed=11)
    captured = {}

    class Spy(tc.Compressor):
        stage, needs_attention, deterministic = "in_llm", True, True
        requires = ("cross_attention",)

        def llm_layers(self):
            return (2,)

        def _compress(self, tokens, k, context):
            captured["cross"] = context.cross_attention
            return tc.selection_result(tokens, torch.arange(k).expand(tokens.shape[0], k))

    with torch.no_grad():
        full = eager(**inputs, output_attentions=True)
        with tc.apply(eager, Spy(), budget=5):
            eager(**inputs)
    start = int((inputs["input_ids"][0] == IMAGE).nonzero()[0])
    tail = inputs["input_ids"].shape[1] - (start + N)  # tokens after the image (same in both rows)
    weights = full.attentions[1].mean(dim=1)  # layer 1 feeds the stage at layer 2
    expected = torch.stack(
        [
            weights[b, -tail:, s : s + N]
            for b, s in enumerate((inputs["input_ids"] == IMAGE).int().argmax(dim=1).tolist())
        ]
    )
    torch.testing.assert_close(captured["cross"], expected)


def test_sparsevlm_runs_its_three_stages_and_decodes_consistently(eager):
    inputs = llava_prompt(eager, batch=2, pad=[0, 2], seed=12)
    comp = tc.create("sparsevlm", layers=[1, 2, 3])
    expected = comp.stage_budgets(N)  # the authors' 192-row scaled to N = 36, kept + merged per stage
    replay = Replay(comp)
    with tc.apply(eager, replay) as handle:
        cached, seen = layer_lengths(eager, lambda: greedy(eager, inputs))
        recomputed = greedy(eager, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)
    lengths = dict(seen[:4])
    length = inputs["input_ids"].shape[1]
    assert [lengths[1], lengths[2], lengths[3]] == [length - N + e for e in expected]
    assert [s["tokens_out"] for s in handle.stats[:3]] == [2 * e for e in expected]
    with tc.apply(eager, "sparsevlm", layers=[1, 2, 3]):
        assert torch.equal(greedy(eager, inputs), cached)


class Record(tc.Compressor):
    """Runs ``inner`` and records each stage's tokens, context and result."""

    stage = "in_llm"
    deterministic = True

    def __init__(self, inner):
        self.inner = inner
        self.requires, self.carries = inner.requires, inner.carries
        self.in_llm_positions = inner.in_llm_positions
        self.calls = []

    def llm_layers(self):
        return self.inner.llm_layers()

    def stage_budgets(self, n):
        return self.inner.stage_budgets(n)

    def _compress(self, tokens, k, context):
        result = self.inner.compress(tokens, k, context)
        self.calls.append((tokens, context, result))
        return result


@pytest.mark.parametrize("per_layer", [False, True])
def test_sparsevlm_raters_chosen_at_the_first_layer_are_reused(eager, per_layer):
    # The authors choose t_token_idx once before the decoder loop (Gumpest/SparseVLMs,
    # modelling_sparse_llama.py l.198-204 at main 26a5f48) and every pruning layer scores with them
    # (l.253, l.259). Through tc.apply, the raters of layers 2 and 3 are those chosen at layer 1 (the
    # integration carries info["raters"] as Context.raters); with raters_per_layer=True each layer's own.
    from reference_sparsevlm import literal_prefill, raters_attention

    inputs = llava_prompt(eager, batch=2, pad=[0, 2], seed=12)
    comp = tc.create("sparsevlm", layers=[1, 2, 3], raters_per_layer=per_layer)
    record = Record(comp)
    with tc.apply(eager, record), torch.no_grad():
        eager(**inputs)
    assert len(record.calls) == 3
    contexts = [context for _, context, _ in record.calls]
    assert [(c.layer, c.schedule_n) for c in contexts] == [(1, N), (2, N), (3, N)]
    assert contexts[0].raters is None  # the first stage chooses; each later one is handed the previous one's
    for context, (_, _, previous) in zip(contexts[1:], record.calls):
        assert torch.equal(context.raters, previous.info["raters"])
    counts, changed = comp.stage_counts(N), False
    for b in range(2):
        stages = [(tokens[b], context.cross_attention[b]) for tokens, context, _ in record.calls]
        literal = literal_prefill(stages, counts, lambda x, a: raters_attention(a), per_layer=per_layer)
        for (idx, positions, values, assignment), (_, _, result) in zip(literal, record.calls):
            assert result.info["raters"][b].nonzero().squeeze(1).tolist() == idx
            assert result.indices[b].tolist() == positions and result.assignment[b].tolist() == assignment
            torch.testing.assert_close(result.tokens[b], values, rtol=1e-4, atol=1e-4)
        firsts = [idx for idx, *_ in literal]
        assert per_layer or firsts == [firsts[0]] * 3
        changed |= any(raters_attention(a) != firsts[0] for _, a in stages[1:])
    assert changed  # at layers 2 or 3 the per-layer rule picks other raters: the reuse is observable


def test_sparsevlm_under_sdpa_needs_eager(sdpa):
    inputs = llava_prompt(sdpa, seed=13)
    with tc.apply(sdpa, "sparsevlm", layers=[1, 2, 3]):
        with pytest.raises(RuntimeError, match="allow_eager_fallback=True"), torch.no_grad():
            sdpa(**inputs)
    with tc.apply(sdpa, "sparsevlm", layers=[1, 2, 3], allow_eager_fallback=True), torch.no_grad():
        assert sdpa(**inputs).logits.isfinite().all()


def test_eager_switch_is_undone_when_the_layer_raises(sdpa):
    """The fallback switches one layer to eager during prefill; a raising layer must not leave it switched."""
    inputs = llava_prompt(sdpa, seed=8)
    fastv_layer = tc.create("fastv").layer
    attention = sdpa.model.language_model.layers[fastv_layer - 1].self_attn

    def boom(module, args, kwargs):
        assert module.config._attn_implementation == "eager"  # the switch ran before this hook
        raise ZeroDivisionError("a layer that fails")

    with tc.apply(sdpa, "fastv", budget=10, allow_eager_fallback=True):
        with (
            pre_hooks((attention, boom)),
            pytest.raises(ZeroDivisionError, match="a layer that fails"),
            torch.no_grad(),
        ):
            sdpa(**inputs)
        assert attention.config._attn_implementation == "sdpa"
