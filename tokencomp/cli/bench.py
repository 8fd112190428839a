"""``tokencomp bench``: time every strategy's kernel, with ratios against references from the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tokencomp.errors import InputError

from . import _parse, _render
from ._app import console, say, user_errors

__all__ = ["bench_command"]


def _goals(out: Path, repeats: int) -> None:
    from tokencomp.analysis import bench

    references, found = bench.goals(repeats)
    bench.write_csv(out / "references.csv", references)
    bench.write_csv(
        out / "goals.csv", [{"goal": g.name, "ratio": g.ratio, "limit": g.limit, "met": g.met} for g in found]
    )
    _render.bench_goals(references, found)


def _scaling(out: Path, names: list[str], sizes: list[int], **timing: Any) -> list[dict[str, Any]]:
    from tokencomp.analysis import bench

    curve = bench.scaling(names, frames=sizes, repeats=1, **timing)
    summary = bench.scaling_summary(curve)
    bench.write_csv(out / "scaling.csv", curve)
    bench.write_csv(out / "scaling_summary.csv", summary)
    bench.plot_scaling(curve, out / "scaling.png")
    _render.bench_scaling(summary, min(sizes) * bench.FRAME_TOKENS, max(sizes) * bench.FRAME_TOKENS)
    return curve


def _strategies(
    out: Path, names: list[str], shapes: list[Any], curve: list[dict[str, Any]], max_ms: float, **timing: Any
) -> None:
    from tokencomp.analysis import bench

    rows = []
    for s in shapes:
        for name in names:
            predicted = bench.predict_ms(curve, name, s)
            if predicted is not None and predicted > max_ms:
                say(
                    f"[yellow]{name} at {s.label()} skipped:[/] predicted {predicted / 1e3:.0f} s per call "
                    "from its scaling curve and complexity, over --max-ms"
                )
                continue
            try:
                rows.append(bench.bench_strategy(name, s, **timing))
            except InputError as exc:  # a strategy that cannot keep this budget says why
                say(f"[yellow]{name} at {s.label()} skipped:[/] {exc}")
    bench.write_csv(out / "strategies.csv", rows)
    _render.bench_strategies(rows)


def bench_command(
    strategy: list[str] = typer.Option(
        [], "--strategy", "-s", help="Strategy to time (repeatable). [default: all registered]"
    ),
    shape: list[str] = typer.Option(
        [],
        "--shape",
        help="B x N x D : K to time every strategy at (repeatable). [default: 16x576x1024:64 and 1x18432x1024:2304]",
    ),
    frames: str = typer.Option(
        "1,2,4,8,16,32", "--frames", help="Scaling curve: frames of 576 tokens (comma list; empty to skip)."
    ),
    goals: bool = typer.Option(
        True, "--goals/--no-goals", help="Time ApET against the authors' procedure, LAPACK and the matmul floor."
    ),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed calls per figure (the fastest is reported)."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak memory (one extra call each)."),
    max_ms: float = typer.Option(
        20000.0,
        "--max-ms",
        min=1.0,
        help="Skip a strategy at a size where its scaling curve and complexity predict a longer call.",
    ),
    device: str = typer.Option("cpu", "--device", help="Device of the tokens (cpu, cuda, cuda:1, ...)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    out: Path = typer.Option(
        Path("tokencomp-bench"), "--out", "-o", help="Folder for the CSV tables and the scaling plot."
    ),
) -> None:
    """Time every strategy's kernel and print ratios against references measured in the same run."""
    from tokencomp.analysis import bench

    with user_errors():
        names = _parse.strategy_names(strategy)
        shapes = [bench.BenchShape.parse(s) for s in (shape or bench.DEFAULT_SHAPES)]
        sizes = _parse.positive_ints("--frames", frames)
        timing = {"dtype": _parse.dtype(dtype), "device": _parse.device(device), "memory": memory}
        _parse.output_folder(out)
    if goals:
        _goals(out, repeats)
    curve = _scaling(out, names, sizes, max_ms=max_ms, **timing) if sizes else []
    _strategies(out, names, shapes, curve, max_ms, repeats=repeats, **timing)
    console.print(f"tables and plot written to {out}")
