"""Prefill speed of a mid-sized random LLaVA with and without compression (CPU, SDPA).

Run: ``python benchmarks/llava_prefill.py [--layers 8] [--hidden 1024] [--repeats 5]``

Prints, for each strategy and budget, the median prefill time (vision tower + projector + compression +
language-model prefill, one forward with ``use_cache=True``), the speedup over the uncompressed model
measured in the same run, and the compression's share of the compressed prefill (from ``handle.stats``).
Ratios, not absolute times, are the result: the machine is noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import tokencomp as tc


def build(layers: int, hidden: int) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
        projection_dim=256,
    )
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=31999,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def prefill_seconds(model, inputs, repeats: int) -> float:
    times = []
    with torch.no_grad():
        model(**inputs, use_cache=True)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs, use_cache=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--question", type=int, default=20, help="tokens after the image")
    parser.add_argument("--strategies", default="apet,random,divprune,pooling")
    parser.add_argument("--budgets", default="64,192")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    model = build(args.layers, args.hidden)
    # LLaVA-1.5's layout: 35 system/user tokens, the 576 image tokens, then the question
    ids = torch.tensor([[1] + list(range(100, 134)) + [31999] * 576 + list(range(200, 200 + args.question))])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 336, 336)}
    base = prefill_seconds(model, inputs, args.repeats)
    print(
        f"LLaVA random: {args.layers} layers, hidden {args.hidden}, 576 image tokens, "
        f"prompt {ids.shape[1]} tokens, SDPA, "
        f"{torch.get_num_threads()} threads; uncompressed prefill {base * 1000:.0f} ms (median of {args.repeats})"
    )
    print(f"{'strategy':<10} {'budget':>6} {'prefill ms':>11} {'speedup':>8} {'compress share':>15}")
    for name in args.strategies.split(","):
        for budget in (int(b) for b in args.budgets.split(",")):
            with tc.apply(model, name, budget=budget) as handle:
                seconds = prefill_seconds(model, inputs, args.repeats)
                share = statistics.median(s["compress_seconds"] / s["prefill_seconds"] for s in handle.stats)
            print(f"{name:<10} {budget:>6} {seconds * 1000:>11.0f} {base / seconds:>7.2f}x {share:>14.1%}")


if __name__ == "__main__":
    main()
