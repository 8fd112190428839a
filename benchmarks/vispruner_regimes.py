"""VisPruner's two regimes: its time with the cosine cache forced off and on, and each regime's fitted slope.

Run: ``python benchmarks/vispruner_regimes.py [--off-frames 2,4,8,16] [--on-frames 2,4,8]``

``tokencomp bench`` fits one slope to VisPruner's whole scaling curve, which crosses from the cached regime
(the ``R x R`` cosines of the residual tokens kept while they fit ``_GRAM_FACTOR`` times the input) to the
uncached one (every round multiplies the tokens anew) at about 4,600 tokens. This script times each regime
alone (one call per size, 576 tokens per frame, 1024 channels, 12.5 % kept, as the bench's curve) and fits
its slope against ``O(N^3 D)``. The uncached run at 16 frames takes about 100 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time

import torch

import tokencomp as tc
import tokencomp.strategies.vispruner as vispruner
from tokencomp.analysis.bench import FRAME_TOKENS, loglog_slope
from tokencomp.testing import make_context


def seconds(frames: int) -> float:
    """One VisPruner call on ``frames`` frames of random tokens, keeping 12.5 %."""
    n = FRAME_TOKENS * frames
    x = torch.randn(1, n, 1024, generator=torch.Generator().manual_seed(0))
    comp = tc.create("vispruner")
    context = make_context(comp, x, grid=(frames, 24, 24))
    start = time.perf_counter()
    comp.compress(x, n // 8, context)
    return time.perf_counter() - start


def regime(name: str, factor: int, frames: list[int]) -> None:
    saved = vispruner._GRAM_FACTOR
    vispruner._GRAM_FACTOR = factor
    try:
        times = []
        for f in frames:
            times.append(seconds(f))
            print(f"{name}: {FRAME_TOKENS * f:>6} tokens {times[-1]:8.2f} s", flush=True)
    finally:
        vispruner._GRAM_FACTOR = saved
    slope = loglog_slope([FRAME_TOKENS * f for f in frames], times)
    print(f"{name}: fitted slope {slope:.2f} (declared O(N^3 D): 3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--off-frames", default="2,4,8,16", help="sizes (frames of 576 tokens) without the cache")
    parser.add_argument("--on-frames", default="2,4,8", help="sizes with the cache (it fits up to about 8 frames)")
    args = parser.parse_args()
    regime("cache off", 0, [int(f) for f in args.off_frames.split(",")])
    regime("cache on", vispruner._GRAM_FACTOR, [int(f) for f in args.on_frames.split(",")])


if __name__ == "__main__":
    main()
