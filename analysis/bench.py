"""Speed and memory of every strategy's kernel, against references timed in the same run.

``tokencomp bench`` is built from these functions. Times on a shared machine drift by tens of per cent
from one minute to the next, so every figure that matters is a *ratio* of two times measured one after
the other in the same run:

- **the authors' procedure**: ApET's stage 1 as the authors' code runs it, image by image
  (:mod:`tokencomp.analysis.authors_apet`);
- **LAPACK**: a full pivoted QR of the same tokens, ``scipy.linalg.qr(X^T, pivoting=True)``, against
  ApET with the greedy QR basis, which needs only ``M`` pivots;
- **a matmul floor**: one ``[N, D] x [D, K]`` product of the same size and dtype, the least work that
  touches every input value ``K`` times (roofline-like: any strategy that compares tokens with ``K``
  others costs at least this);
- **the scaling curve**: each strategy from one image (576 tokens) to a 32-frame clip (18,432 tokens),
  whose log-log slope is checked against the strategy's declared ``complexity``; a strategy that
  switches algorithms at a memory bound (its ``cost_regimes``) also gets a curve per algorithm,
  ``name[regime]``, each checked alike.

Peak memory is the largest amount allocated above what was allocated before the call (the output
included), from the profiler's allocation timeline on CPU and the allocator's statistics on CUDA,
reported as a multiple of the input's size.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from tokencomp import create, get
from tokencomp.errors import InputError
from tokencomp.synthetic import make_context

from .authors_apet import authors_apet
from .measure import peak_bytes, time_ms

FRAME_TOKENS = 576  # one LLaVA-1.5 image (24 x 24 patches) or one video frame
SCALING_FRAMES = (1, 2, 4, 8, 16, 32)
DEFAULT_SHAPES = ("16x576x1024:64", "1x18432x1024:2304")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class BenchShape:
    """A benchmark point: ``b`` images of ``n`` tokens of width ``d``, ``budget`` kept per image."""

    b: int
    n: int
    d: int
    budget: int

    @classmethod
    def parse(cls, text: str) -> "BenchShape":
        """``"BxNxD:K"``, e.g. ``"16x576x1024:64"``.

        Raises
        ------
        ValueError
            If the text does not have that form or a number is out of range (``K`` in ``[1, N]``).
        """
        match = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+):(\d+)\s*", text)
        if not match:
            raise InputError(f"shape {text!r} is not of the form BxNxD:K (for example 16x576x1024:64).")
        b, n, d, k = (int(v) for v in match.groups())
        if min(b, n, d, k) < 1 or k > n:
            raise InputError(f"shape {text!r}: B, N, D, K must be >= 1 and K <= N; got B={b} N={n} D={d} K={k}.")
        return cls(b, n, d, k)

    def label(self) -> str:
        return f"{self.b}x{self.n}x{self.d}:{self.budget}"

    def grid(self, frame_tokens: int = FRAME_TOKENS) -> Optional[tuple[int, ...]]:
        """``(h, w)`` for a square ``n``, ``(t, h, w)`` for whole square frames, else ``None``."""
        side = math.isqrt(frame_tokens)
        if self.n == frame_tokens and side * side == frame_tokens:
            return (side, side)
        if side * side == frame_tokens and self.n % frame_tokens == 0:
            return (self.n // frame_tokens, side, side)
        root = math.isqrt(self.n)
        return (root, root) if root * root == self.n else None


def bench_tokens(shape: BenchShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Reproducible Gaussian tokens ``[B, N, D]`` with per-token scale, like real features' spread of norms."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.b, shape.n, shape.d, generator=g) * (0.5 + torch.rand(shape.b, shape.n, 1, generator=g))
    return x.to(device=device, dtype=dtype)


def write_csv(path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` as CSV with the union of their keys as columns (first-seen order); nothing if empty."""
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------- complexity
_GROWING = {"N", "K", "L"}  # symbols that grow with the number of tokens at a fixed kept fraction


def complexity_exponent(complexity: str) -> Optional[int]:
    """Power of ``N`` in a strategy's declared ``complexity`` when ``K`` is a fixed fraction of ``N``.

    The expression is ``O(term + term ...)`` with each term a product of symbols: ``N`` tokens, ``K``
    kept, ``L`` sequence length (all grow with ``N``), anything else (``D``, ``M``, ``T``, ``H``) fixed;
    ``log N`` factors count as zero. ``None`` for an empty declaration.

    >>> complexity_exponent("O(M N D + (N - K) K D)")
    2
    """
    text = complexity.strip()
    if not text:
        return None
    inner = re.fullmatch(r"O\((.*)\)", text)
    if not inner:
        raise InputError(f"complexity {complexity!r} is not of the form O(...).")
    best = 0
    for term in re.split(r"\+(?![^()]*\))", inner.group(1)):
        term = re.sub(r"log\s*\w+", "", term)
        factors = re.findall(r"\([^()]*\)|[A-Za-z]+(?:\^\d+)?", term)
        power = 0
        for factor in factors:
            if factor.startswith("("):
                power += int(bool(_GROWING & set(re.findall(r"[A-Za-z]+", factor))))
                continue
            symbol, _, exp = factor.partition("^")
            if symbol in _GROWING:
                power += int(exp or 1)
        best = max(best, power)
    return best


def loglog_slope(ns: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of ``log(time)`` against ``log(n)``."""
    if len(ns) < 2:
        raise ValueError("a slope needs at least two points")
    xs = [math.log(v) for v in ns]
    ys = [math.log(max(t, 1e-9)) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


# ---------------------------------------------------------------------- one strategy at one shape
def _call(
    name: str, x: torch.Tensor, shape: BenchShape, frame_tokens: int, params: Optional[dict[str, Any]] = None
) -> Callable[[], Any]:
    compressor = create(name, **(params or {}))
    context = make_context(compressor, x, grid=shape.grid(frame_tokens))
    return lambda: compressor.compress(x, shape.budget, context)


def matmul_floor(x: torch.Tensor, k: int) -> Callable[[], torch.Tensor]:
    """One ``[B N, D] x [D, k]`` product in ``x``'s dtype (the roofline-like reference)."""
    w = torch.randn(x.shape[-1], k, generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    return lambda: flat @ w


def bench_strategy(
    name: str,
    shape: BenchShape,
    *,
    repeats: int = 3,
    dtype: torch.dtype = torch.float32,
    device: torch.device = CPU,
    frame_tokens: int = FRAME_TOKENS,
    memory: bool = True,
) -> dict[str, Any]:
    """Time (and peak memory) of one strategy at ``shape``, with the matmul floor timed beside it.

    Returns
    -------
    dict
        ``strategy``, ``shape``, ``ms``, ``matmul_ms``, ``x_matmul`` (the ratio), ``peak_mib`` and
        ``x_input`` (peak over the input's size), the last two ``nan`` when ``memory`` is off.
    """
    x = bench_tokens(shape, dtype, device)
    run = _call(name, x, shape, frame_tokens)
    ms = time_ms(run, repeats, device)
    floor = time_ms(matmul_floor(x, shape.budget), repeats, device)
    return {
        "strategy": name,
        "shape": shape.label(),
        "ms": ms,
        "matmul_ms": floor,
        "x_matmul": ms / floor,
        **_peak(run, x, device, memory),
    }


def _peak(run: Callable[[], Any], x: torch.Tensor, device: torch.device, memory: bool) -> dict[str, float]:
    """``peak_mib`` and ``x_input`` (peak over the size of ``x``) of ``run``; both ``nan`` without ``memory``."""
    peak = float(peak_bytes(run, device)) if memory else math.nan
    return {"peak_mib": peak / 2**20, "x_input": peak / (x.numel() * x.element_size())}


def _power(name: str) -> int:
    """The declared power of ``N`` of a strategy, 2 when it declares none (for extrapolating times)."""
    return complexity_exponent(get(name).complexity) or 2


def strategy_of(label: str) -> str:
    """The strategy name of a scaling curve's label: ``"vispruner[cached]"`` -> ``"vispruner"``."""
    return label.split("[", 1)[0]


def scaling_curves(names: Iterable[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, strategy, parameters)`` of every scaling curve: each strategy as created by default, then
    one ``name[regime]`` per entry of its ``cost_regimes``."""
    out = []
    for name in names:
        out.append((name, name, {}))
        out.extend((f"{name}[{regime}]", name, dict(params)) for regime, params in get(name).cost_regimes.items())
    return out


# ---------------------------------------------------------------------- ApET against its references
def authors_reference(shape: BenchShape, repeats: int = 1) -> dict[str, Any]:
    """Batched ApET against the authors' procedure run image by image on the same tokens (CPU, float32).

    The two outputs are checked to be equal before anything is timed (same FPS start per image).
    """
    x = bench_tokens(shape, torch.float32, torch.device("cpu"))
    apet = create("apet")
    result = apet.compress(x, shape.budget)
    starts = result.info["basis_indices"][:, 0]
    reference = authors_apet(x, shape.budget, starts)
    if not torch.allclose(result.tokens, reference, rtol=1e-4, atol=1e-4):
        raise RuntimeError("the batched ApET and the authors' per-image procedure disagree; not timing them")
    ours = time_ms(lambda: apet.compress(x, shape.budget), max(repeats, 3))
    theirs = time_ms(lambda: authors_apet(x, shape.budget, starts), repeats)
    return {
        "reference": "authors' procedure, per image",
        "shape": shape.label(),
        "ours_ms": ours,
        "reference_ms": theirs,
        "ratio": ours / theirs,
    }


def lapack_reference(shape: BenchShape, repeats: int = 3, mode: str = "r") -> dict[str, Any]:
    """ApET with the QR basis against ``scipy.linalg.qr(X^T, pivoting=True, mode=mode)`` per image.

    ``mode="r"`` is the least LAPACK computes for the pivots (``geqp3`` and ``R``); ``"full"``, scipy's
    default, also forms ``Q``. The first ``num_basis`` pivots are checked to agree.
    """
    import scipy.linalg

    x = bench_tokens(shape, torch.float32, torch.device("cpu"))
    apet = create("apet", basis="qr")
    result = apet.compress(x, shape.budget)
    arrays = [x[i].numpy().T for i in range(shape.b)]
    for i, a in enumerate(arrays):
        pivots = scipy.linalg.qr(a, pivoting=True, mode="r")[-1][: apet.num_basis]
        if pivots.tolist() != result.info["basis_indices"][i].tolist():
            raise RuntimeError("the QR basis and LAPACK's pivots disagree; not timing them")
    # ~2 ms against ~20 ms calls: about 0.4 s of each, so that both minima are taken over as much of the
    # machine's noise
    ours = time_ms(lambda: apet.compress(x, shape.budget), max(repeats, 200))
    theirs = time_ms(lambda: [scipy.linalg.qr(a, pivoting=True, mode=mode) for a in arrays], max(repeats, 20))
    return {
        "reference": f"scipy.linalg.qr(pivoting=True, mode={mode!r})",
        "shape": shape.label(),
        "ours_ms": ours,
        "reference_ms": theirs,
        "ratio": ours / theirs,
    }


def matmul_reference(shape: BenchShape, columns: int = FRAME_TOKENS, repeats: int = 3) -> dict[str, Any]:
    """ApET at ``shape`` against one ``[B N, D] x [D, columns]`` matmul, with ApET's peak memory."""
    x = bench_tokens(shape, torch.float32, torch.device("cpu"))
    apet = create("apet")
    ours = time_ms(lambda: apet.compress(x, shape.budget), repeats)
    theirs = time_ms(matmul_floor(x, columns), repeats)
    peak = peak_bytes(lambda: apet.compress(x, shape.budget))
    return {
        "reference": f"one {shape.b * shape.n}x{shape.d}x{columns} matmul",
        "shape": shape.label(),
        "ours_ms": ours,
        "reference_ms": theirs,
        "ratio": ours / theirs,
        "peak_x_input": peak / (x.numel() * x.element_size()),
    }


@dataclass(frozen=True)
class Goal:
    """A documented speed goal: a measured ratio and the most it may be."""

    name: str
    ratio: float
    limit: float

    @property
    def met(self) -> bool:
        return self.ratio <= self.limit


def goals(
    repeats: int = 3,
    *,
    image: BenchShape = BenchShape(16, 576, 1024, 64),
    video: BenchShape = BenchShape(1, 18432, 1024, 2304),
) -> tuple[list[dict[str, Any]], list[Goal]]:
    """The references of the performance page and the goals they are held to.

    Returns the reference rows (for a table) and the goals: batched ApET at ``image`` <= 0.1x the
    authors' per-image procedure; ApET-QR on one image <= 0.1x LAPACK's pivoted QR (``mode="r"`` and
    scipy's default ``"full"``); ApET at ``video`` <= 8x one ``18432 x 1024 x 576`` matmul with a peak
    of at most 3x the input.
    """
    one = BenchShape(1, image.n, image.d, image.budget)
    rows = [
        authors_reference(image, repeats=1),
        lapack_reference(one, repeats, "r"),
        lapack_reference(one, repeats, "full"),
        matmul_reference(video, repeats=repeats),
    ]
    found = [
        Goal(f"batched ApET {image.label()} / authors per image", rows[0]["ratio"], 0.1),
        Goal(f"ApET-QR {one.label()} / LAPACK pivoted QR (mode='r')", rows[1]["ratio"], 0.1),
        Goal(f"ApET-QR {one.label()} / LAPACK pivoted QR (mode='full')", rows[2]["ratio"], 0.1),
        Goal(f"ApET {video.label()} / one {video.n}x{video.d}x{FRAME_TOKENS} matmul", rows[3]["ratio"], 8.0),
        Goal(f"ApET {video.label()} peak memory / input size", rows[3]["peak_x_input"], 3.0),
    ]
    return rows, found


# ---------------------------------------------------------------------- the scaling curve
def scaling(
    names: Iterable[str],
    *,
    frames: Sequence[int] = SCALING_FRAMES,
    d: int = 1024,
    keep: float = 0.125,
    frame_tokens: int = FRAME_TOKENS,
    repeats: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device = CPU,
    memory: bool = True,
    max_ms: float = 20_000.0,
    on_row: Optional[Callable[[dict[str, Any]], None]] = None,
) -> list[dict[str, Any]]:
    """Time and peak memory of each strategy from one frame to ``max(frames)`` frames of ``frame_tokens``.

    One image row (``B = 1``) of ``f * frame_tokens`` tokens keeping ``round(keep * N)``. A strategy
    stops at the size where its declared complexity, extrapolated from its last time, predicts more
    than ``max_ms`` per call (VisPruner's ``O(N^3 D)`` reaches minutes at a 32-frame clip); its rows
    then end early, and :func:`scaling_summary` reports the largest size measured. Every curve of
    :func:`scaling_curves` is timed; a row's ``strategy`` is the curve's label.
    """
    rows = []
    for label, name, params in scaling_curves(names):
        power = _power(name)
        last: Optional[tuple[int, float]] = None
        for f in frames:
            n = f * frame_tokens
            if last is not None and last[1] * (n / last[0]) ** power > max_ms:
                break
            shape = BenchShape(1, n, d, max(1, round(keep * n)))
            x = bench_tokens(shape, dtype, device)
            run = _call(name, x, shape, frame_tokens, params)
            try:
                ms = time_ms(run, repeats, device)
            except InputError:  # this strategy, as configured, cannot keep this budget (it says why)
                continue
            row = {"strategy": label, "frames": f, "n": n, "ms": ms, **_peak(run, x, device, memory)}
            rows.append(row)
            last = (n, row["ms"])
            if on_row is not None:
                on_row(row)
    return rows


def predict_ms(curve: Sequence[dict[str, Any]], name: str, shape: BenchShape) -> Optional[float]:
    """Time of ``name`` at ``shape`` extrapolated from its scaling rows by its declared complexity.

    From the measured size nearest to ``shape.n`` (in ratio), scaled by ``(n / n_row) ** power`` and by
    the batch size; ``None`` when the curve has no row of ``name``.
    """
    mine = [r for r in curve if r["strategy"] == name]
    if not mine:
        return None
    power = _power(name)
    row = min(mine, key=lambda r: abs(math.log(shape.n / r["n"])))
    return row["ms"] * (shape.n / row["n"]) ** power * shape.b


def scaling_summary(rows: Sequence[dict[str, Any]], tail: int = 4) -> list[dict[str, Any]]:
    """Per strategy: the fitted slope over the ``tail`` largest sizes against its declared complexity.

    ``ok`` is true when the slope is at most the declared power of ``N`` plus 0.25 (the small sizes,
    where fixed per-call costs dominate, are left out of the fit). A curve ``name[regime]`` is held to
    its strategy's complexity.
    """
    out = []
    for name in dict.fromkeys(r["strategy"] for r in rows):
        mine = sorted((r for r in rows if r["strategy"] == name), key=lambda r: r["n"])[-tail:]
        declared = get(strategy_of(name)).complexity
        power = complexity_exponent(declared)
        slope = loglog_slope([r["n"] for r in mine], [r["ms"] for r in mine]) if len(mine) >= 2 else math.nan
        out.append(
            {
                "strategy": name,
                "complexity": declared or "?",
                "power": power,
                "slope": slope,
                "ok": None if power is None or math.isnan(slope) else slope <= power + 0.25,
                "largest_n": mine[-1]["n"],
                "max_x_input": max(r["x_input"] for r in mine),
            }
        )
    return out


def plot_scaling(rows: Sequence[dict[str, Any]], path) -> None:
    """Log-log plot of time against tokens per strategy, with slope-1 and slope-2 guides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {s["strategy"]: s for s in scaling_summary(rows)}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ns = sorted({r["n"] for r in rows})
    colours = plt.get_cmap("tab20").colors
    for i, (name, info) in enumerate(summary.items()):
        mine = sorted((r for r in rows if r["strategy"] == name), key=lambda r: r["n"])
        style = "--" if strategy_of(name) != name else ("-" if i < len(colours) else "-.")  # regimes dashed
        ax.plot(
            [r["n"] for r in mine],
            [r["ms"] for r in mine],
            marker="os^Dv"[i % 5],
            ms=3,
            color=colours[i % len(colours)],
            linestyle=style,
            label=f"{name}: slope {info['slope']:.2f} ({info['complexity']})",
        )
    if len(ns) >= 2:
        base = min(r["ms"] for r in rows if r["n"] == ns[0])
        for power, style in ((1, ":"), (2, "--")):
            ax.plot(ns, [base * (n / ns[0]) ** power for n in ns], "k" + style, lw=0.8, label=f"slope {power}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens N (576 per frame)")
    ax.set_ylabel("time per call (ms)")
    ax.set_title("Compression time against the number of tokens (12.5 % kept)")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
