"""PyramidDrop's position ids inside a tiny LLaVA, against the authors' bookkeeping (``reference_pdrop.py``).

After each cut the authors renumber the shorter sequence ``0 .. L' - 1`` and shift every decoding step
down by the tokens dropped so far (``positions="renumber"``, the default); ``positions="keep"`` keeps the
original positions.
"""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from reference_pdrop import literal_decode_positions, literal_pdrop_generate
from tiny_models import llava_prompt, pre_hooks, tiny_llava

N = 36  # image tokens of the tiny LLaVA (84 px, 14 px patches)
IMAGE = 119
# (decoder layers, cuts): three cuts in the 4-layer model, and the paper's 8 / 16 / 24 in a 26-layer one
SCHEDULES = [(4, [1, 2, 3]), (26, [8, 16, 24])]


@pytest.fixture(scope="module")
def models():
    return {layers: tiny_llava(attn_implementation="eager", layers=layers) for layers, _ in SCHEDULES}


class Recorder(tc.Compressor):
    """Runs ``inner`` and records, per call, the visual positions it was given and the ones it kept."""

    stage = "in_llm"
    deterministic = True

    def __init__(self, inner):
        self.inner = inner
        self.requires = inner.requires
        self.in_llm_positions = inner.in_llm_positions
        self.calls = []

    def llm_layers(self):
        return self.inner.llm_layers()

    def stage_budgets(self, n):
        return self.inner.stage_budgets(n)

    def sets_own_budgets(self):
        return self.inner.sets_own_budgets()

    def _compress(self, tokens, k, context):
        result = self.inner.compress(tokens, k, context)
        self.calls.append((context.visual_positions, result.indices))
        return result


def run(model, inputs, comp, new_tokens=3, **kw):
    """Greedy generation under ``comp``; the position ids every decoder layer got in every forward."""
    calls = []

    def spy(module, args, kwargs, i):
        if i == 0:
            calls.append([])
        calls[-1].append(kwargs["position_ids"].clone())

    spies = [
        (layer, lambda m, a, kw, i=i: spy(m, a, kw, i)) for i, layer in enumerate(model.model.language_model.layers)
    ]
    with tc.apply(model, comp), pre_hooks(*spies), torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            suppress_tokens=[IMAGE],
            return_dict_in_generate=True,
            output_logits=True,
            **kw,
        )
    return out, calls


def kept_original_positions(original, calls, visual, cuts):
    """Per cut, the original position ids of the sequence after it, rebuilt from the recorded picks."""
    sequence, current_visual, out = original, visual, []
    for visual_positions, indices in calls[: len(cuts)]:
        keep = ~current_visual
        keep.scatter_(1, visual_positions.gather(1, indices), True)
        rows = [sequence[b][keep[b]] for b in range(sequence.shape[0])]
        current_visual = torch.stack([current_visual[b][keep[b]] for b in range(keep.shape[0])])
        sequence = torch.stack(rows)
        out.append(sequence)
    return out


@pytest.mark.parametrize("layers,cuts", SCHEDULES)
@pytest.mark.parametrize("positions", ["renumber", "keep"])
def test_position_ids_after_each_cut_and_in_decoding(models, layers, cuts, positions):
    model = models[layers]
    inputs = llava_prompt(model, batch=2, pad=[0, 2], seed=21)
    mask = inputs["attention_mask"].bool()
    pad = int((~mask[0]).sum())
    assert bool((mask.sum(dim=1) == mask.shape[1] - pad).all())  # both rows: `pad` pads on the left
    valid = mask.shape[1] - pad
    recorder = Recorder(tc.create("pdrop", layers=cuts, positions=positions))
    out, calls = run(model, inputs, recorder)
    prefill, first_step = calls[0], calls[1]
    original = prefill[0].expand(2, -1)
    assert original[:, pad:].tolist() == [list(range(valid))] * 2  # generate numbers the valid tokens 0 ..
    rebuilt = kept_original_positions(original, recorder.calls, inputs["input_ids"] == IMAGE, cuts)
    dropped = [N - n for n in tc.create("pdrop", layers=cuts).stage_budgets(N)]  # total dropped after each cut
    for s, cut in enumerate(cuts):
        end = cuts[s + 1] if s + 1 < len(cuts) else layers
        for j in range(cut, end):
            ids = prefill[j].expand(2, -1)
            assert ids.shape[1] == mask.shape[1] - dropped[s]
            if positions == "renumber":  # contiguous over the valid tokens; the pads keep theirs
                assert ids[:, pad:].tolist() == [list(range(valid - dropped[s]))] * 2
                assert torch.equal(ids[:, :pad], original[:, :pad])
            else:
                assert torch.equal(ids, rebuilt[s])
    for j in range(cuts[0]):
        assert torch.equal(prefill[j].expand(2, -1), original)
    # the first decoding step, layer by layer, as the authors' decode branch shifts it
    ratios = [0.5 ** (s + 1) for s in range(len(cuts))]
    expected = literal_decode_positions([valid, valid], layers, cuts, [1.0] + ratios, [N, N])
    if positions == "keep":
        expected = [[valid, valid]] * layers
    assert [ids.expand(2, 1)[:, 0].tolist() for ids in first_step] == expected
    if positions == "renumber":
        assert expected[-1] == [valid - dropped[-1]] * 2  # prompt length minus every token dropped
    # every later step moves on by one from there
    for t, step in enumerate(calls[2:], start=1):
        assert [ids.expand(2, 1)[:, 0].tolist() for ids in step] == [[a + t for a in e] for e in expected]


@pytest.mark.parametrize("layers,cuts", SCHEDULES)
def test_generation_equals_the_authors_loop(models, layers, cuts):
    model = models[layers]
    inputs = llava_prompt(model, seed=22)
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("embeds", kwargs["inputs_embeds"])

    with pre_hooks((model.model.language_model, grab)), torch.no_grad():
        model(**inputs)  # the embeddings entering the decoder (pdrop acts only inside it)
    image_index = int((inputs["input_ids"][0] == IMAGE).nonzero()[0])
    with torch.no_grad():
        generated, logits, positions = literal_pdrop_generate(
            model, captured["embeds"], image_index, N, cuts, [0.5, 0.25, 0.125], 5, [IMAGE]
        )
    out, calls = run(model, inputs, tc.create("pdrop", layers=cuts), new_tokens=5)
    length = inputs["input_ids"].shape[1]
    assert out.sequences[0, length:].tolist() == generated
    torch.testing.assert_close(torch.cat(out.logits).float(), logits, rtol=1e-5, atol=1e-5)
    ours = [[ids[0].tolist() for ids in step] for step in calls]
    assert ours == [[p[0] for p in step] for step in positions]


def test_cached_decoding_equals_recomputation_when_renumbered(models):
    layers, cuts = SCHEDULES[1]
    model = models[layers]
    inputs = llava_prompt(model, batch=2, seed=23)
    with tc.apply(model, "pdrop", layers=cuts) as handle, torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE])
    assert [s["tokens_out"] for s in handle.stats] == [36, 18, 8]
    # recomputation re-ranks with the new tokens in the prompt, so replay the prefill's picks
    picks = []

    class Replay(Recorder):
        def _compress(self, tokens, k, context):
            if len(picks) < len(cuts):
                picks.append(self.inner.compress(tokens, k, context))
            self.calls.append(None)
            return picks[(len(self.calls) - 1) % len(cuts)]

    replay = Replay(tc.create("pdrop", layers=cuts))
    with tc.apply(model, replay), torch.no_grad():
        recomputed = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE], use_cache=False
        )
    assert torch.equal(cached, recomputed)
