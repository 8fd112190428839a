"""Time and peak memory of one call: the one way the bench, the ablation and the VLM analysis measure."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

__all__ = ["peak_bytes", "peak_memory", "synchronize", "time_ms", "timed"]

_CPU = torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device = _CPU) -> tuple[Any, float]:
    """``fn()``'s output and the wall time of that one call in milliseconds (queued kernels included)."""
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, (time.perf_counter() - start) * 1e3


def time_ms(fn: Callable[[], Any], repeats: int, device: torch.device = _CPU, long_ms: float = 2000.0) -> float:
    """Fastest wall time of ``fn`` in milliseconds over ``repeats`` calls, after one warm-up call.

    The minimum, as ``timeit`` advises: other processes only ever add time, so the fastest call is
    the one least disturbed, and a ratio of two minima compares the two computations themselves.
    A call whose warm-up took longer than ``long_ms`` is timed once more only (seconds-long calls
    are not disturbed by much in relative terms).
    """
    start = time.perf_counter()
    fn()
    synchronize(device)
    if (time.perf_counter() - start) * 1e3 > long_ms:
        repeats = 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def peak_bytes(fn: Callable[[], Any], device: torch.device = _CPU) -> int:
    """Largest number of bytes ``fn`` had allocated at once on ``device`` beyond what existed before."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return peak_memory(fn)[1]


def peak_memory(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` under the PyTorch profiler; return its output and the peak of the bytes it had allocated
    on the CPU at any moment (allocations minus frees, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return out, peak
