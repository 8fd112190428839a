"""The ``tokencomp`` command line: ``ls``, ``ablate``, ``report``, ``bench`` and ``generate``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import tokencomp as tc
from tokencomp.errors import InputError, UnknownStrategyError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compare visual-token compression strategies for vision-language models.",
)
# A pipe or CI log gets a wide console instead of rich's 80 columns, so tables stay readable.
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)


class UserError(Exception):
    """A mistake in the command line: reported on one line, exit code 2."""


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def _user_errors(on_interrupt: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """The one boundary between the caller's mistakes and bugs.

    A mistake on the command line (:class:`UserError`), a value tokencomp refuses
    (:class:`~tokencomp.errors.InputError`) or a file that cannot be read or written (``OSError``) is
    printed on one line with exit code 2. Every other exception is a bug and keeps its traceback.
    ``on_interrupt`` handles Ctrl-C (it is re-raised without one).
    """
    try:
        yield
    except (UserError, InputError, OSError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        if on_interrupt is None:
            raise
        on_interrupt()


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


@app.command("ls")
def ls_command(
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table (the README's) instead."),
) -> None:
    """List the registered strategies and their capabilities (read from the classes)."""
    if markdown:
        typer.echo(strategy_markdown())
        return
    table = Table(title="tokencomp strategies")
    columns = ("name", "stage", "needs attention", "FlashAttention", "text", "deterministic", "needs context", "time", "summary")
    for column in columns:
        table.add_column(column, overflow="fold")
    for name in tc.available():
        cls = tc.get(name)
        table.add_row(
            name,
            cls.stage,
            _yes(cls.needs_attention),
            cls.flash_attention(),
            _yes(cls.text_conditioned),
            _yes(cls.deterministic),
            ", ".join(cls.requires) or "-",
            cls.complexity or "?",
            cls.summary,
        )
    console.print(table)


def strategy_markdown() -> str:
    """The registry as a Markdown table: name, paper, stage, needs attention, FlashAttention, time, summary."""
    lines = [
        "| name | paper | stage | needs attention | FlashAttention / SDPA | time | summary |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in tc.available():
        cls = tc.get(name)
        cells = [f"`{name}`", cls.paper or "(reference)", cls.stage, "yes" if cls.needs_attention else "no",
                 cls.flash_attention(), cls.complexity or "?", cls.summary]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _split(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{what} is empty; give a comma-separated list")
    return items


def _parse_budgets(text: str) -> list[int | float]:
    budgets: list[int | float] = []
    for item in _split(text, "--budgets"):
        try:
            budgets.append(int(item))
        except ValueError:
            try:
                budgets.append(float(item))
            except ValueError:
                raise UserError(f"--budgets: {item!r} is not a number; use counts like 64 or fractions like 0.25") from None
    return budgets


def _output_folder(path: Path, option: str = "--out") -> Path:
    """``path`` created (with its parents) and checked by writing a temporary file in it.

    Raises
    ------
    UserError
        ``path`` is a file, cannot be created, or files cannot be written in it.
    """
    import tempfile

    fix = "give a folder you can write to (it is created when missing)"
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {str(path)!r} is a file, not a folder; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"{option} {str(path)!r} is not writable ({reason}); {fix}") from None
    return path


def _param_grid(spec: str) -> tuple[str, str, list[Any]]:
    """``--param STRATEGY.PARAM=V1,V2`` as ``(strategy, param, values)``; empty values are refused."""
    from tokencomp.analysis.ablation import parse_param

    strategy, key, values = parse_param(spec)
    if any(v == "" for v in values):
        raise UserError(
            f"malformed parameter grid {spec!r}: it has an empty value; expected STRATEGY.PARAM=V1,V2,... "
            "e.g. apet.basis=fps,qr,random"
        )
    return strategy, key, values


def _interrupted(run: dict[str, Any]) -> None:
    """Ctrl-C during ``ablate``: save the cells finished since the last save, say how to continue, exit 130."""
    from tokencomp.analysis.results import save_results

    if not run.get("rows"):
        console.print("interrupted before any cell finished; nothing was written", highlight=False, soft_wrap=True)
        raise typer.Exit(code=130)
    target, rows = run["target"], run["rows"]
    try:
        if run["fresh"]:
            save_results(target, rows, run["meta"])
    except (OSError, KeyboardInterrupt) as exc:  # a second Ctrl-C while saving: the files stay as they were
        reason = "interrupted again" if isinstance(exc, KeyboardInterrupt) else str(exc)
        console.print(f"interrupted; the cells finished since the last save were not saved to {target} ({reason}); "
                      "run the same command with --resume to continue from the saved ones", highlight=False, soft_wrap=True)
        raise typer.Exit(code=130) from None
    console.print(
        f"interrupted: {len(rows)} finished cells are saved in {target}; run the same command with --resume to "
        "finish the rest", highlight=False, soft_wrap=True,
    )
    raise typer.Exit(code=130)


def _print_tables(rows: list[dict[str, Any]]) -> None:
    from tokencomp.analysis.report import METRICS, eager_ratios, metric_table
    from tokencomp.analysis.results import flash_measurements

    for features in dict.fromkeys(r["features"] for r in rows):
        for metric in METRICS:
            if metric.key == "time_ms":
                continue
            table = metric_table(rows, features, metric.key)
            if table is None:
                continue
            direction = "higher" if metric.higher_is_better else "lower"
            shown = Table(
                title=f"{metric.title} ({features}, {table.n_images} images{', mean ± 95% CI' if metric.ci else ''}; "
                f"{direction} is better)",
                title_justify="left",
            )
            shown.add_column("strategy")
            for b in table.columns:
                shown.add_column(table.kept[b], justify="right")
            for name, cells in table.rows:
                texts = []
                for c in cells:
                    text = "-" if c is None else f"{c[0]:.4f}" + (f" ± {c[1]:.4f}" if not math.isnan(c[1]) else "")
                    texts.append(f"[bold green]{text}[/]" if c is not None and c[2] else text)
                shown.add_row(name, *texts)
            console.print(shown)
    flash = {name: m for name, m in flash_measurements(rows).items() if m[0]}
    if flash:
        table = Table(title="FlashAttention compatibility, measured inside the VLM (forced FLASH_ATTENTION backend)",
                      title_justify="left")
        for column in ("strategy", "runs under FlashAttention", "eager / SDPA time, memory (LLaVA-1.5-7B shape)"):
            table.add_column(column)
        for name, (_, failed) in flash.items():
            ratios = None if failed is None else eager_ratios(failed)
            cost = "" if ratios is None else f"{ratios[0]:.1f}x time, {ratios[1]:.1f}x memory"
            table.add_row(name, "[green]yes[/]" if failed is None else "[red]no: needs eager[/]", cost)
        console.print(table)


# `tokencomp ablate` options that a --config TOML file may set (its keys), with their built-in defaults.
ABLATE_DEFAULTS: dict[str, Any] = {
    "strategies": None,
    "budgets": "64,128,192",
    "features": "efficientnet,pixels",
    "params": None,
    "images": None,
    "max_images": None,
    "views": "full,flip,crop-tl,crop-br",
    "seed": 0,
    "out": "tokencomp-ablation",
    "vlm": True,
    "focus": "apet",
}


def _read_config(path: Path) -> dict[str, Any]:
    """A TOML file of ``tokencomp ablate`` options; lists may be given as TOML arrays; ``[params.NAME]``
    tables give parameter grids (``basis = ["fps", "qr"]``)."""
    import tomllib

    if not path.is_file():
        raise UserError(f"--config {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--config {str(path)!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(ABLATE_DEFAULTS))
    if unknown:
        raise UserError(f"--config {str(path)!r}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(ABLATE_DEFAULTS)}")
    config: dict[str, Any] = {}
    for key, value in data.items():
        if key == "params":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise UserError(f"--config: 'params' must be tables like [params.apet] with basis = [\"fps\", \"qr\"]; got {value!r}")
            config[key] = [f"{s}.{p}=" + ",".join(json.dumps(x) if not isinstance(x, str) else x for x in (v if isinstance(v, list) else [v]))
                           for s, grid in value.items() for p, v in grid.items()]
        elif isinstance(value, list):
            config[key] = ",".join(str(v) for v in value)
        else:
            config[key] = value
    return config


def _meta(options: dict[str, Any], n_images: int, notes: list[str]) -> dict[str, Any]:
    import datetime

    import torch
    import transformers

    return {
        "date": datetime.date.today().isoformat(),
        "tokencomp": tc.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": options["seed"],
        "images": str(options["images"]) if options["images"] else "bundled",
        "n_images": n_images,
        "max_images": options["max_images"],
        "views": options["views"],
        "budgets": options["budgets"],
        "features": options["features"],
        "vlm": options["vlm"],
        "focus": options["focus"],
        "notes": notes,
    }


def _example_image(meta: dict[str, Any]):
    """The first image of the run, for the kept-token overlays (``None`` when it cannot be found)."""
    from tokencomp.data import BUNDLED_IMAGES, bundled_images, load_image_folder

    try:
        if meta.get("images", "bundled") == "bundled":
            return bundled_images(BUNDLED_IMAGES[:1])[0][1]
        return load_image_folder(Path(meta["images"]))[0][1]
    except (OSError, InputError, IndexError, KeyError):
        return None


VLM_FEATURES = "tiny-llava"  # the features column of the rows measured inside the tiny VLM
VLM_NOTE = (
    "tiny-llava rows: a random-weight LLaVA-1.5 layout built from its config classes (CLIP tower at 336 px, "
    "576 visual tokens, 32-layer Llama decoder, hidden size 64). Its answers mean nothing; its code paths "
    "(the tower's [CLS] row, the decoder's attention at a layer, the cut sequence) are the real ones. "
    "next_token_agreement / logit_kl compare it with itself uncompressed; position_bias there shuffles the "
    "image's 14 px patches. Strategies with their own per-layer schedule run at their defaults (budget: own schedule)."
)


@app.command("ablate")
def ablate_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A TOML file of these options (flags given here win)."),
    strategies: Optional[str] = typer.Option(
        None, "--strategies", "-s", help="Comma-separated strategy names (default: every registered one that can run)."
    ),
    budgets: Optional[str] = typer.Option(None, "--budgets", "-b", help="Comma-separated budgets (counts or fractions). [default: 64,128,192]"),
    features: Optional[str] = typer.Option(
        None, "--features", "-f", help="efficientnet, pixels and/or hf:MODEL (a CLIP / SigLIP tower). [default: efficientnet,pixels]"
    ),
    param: Optional[list[str]] = typer.Option(
        None, "--param", "-p", help="Parameter grid STRATEGY.PARAM=V1,V2 (repeatable); replaces the default grid."
    ),
    images: Optional[Path] = typer.Option(None, "--images", help="A folder of your own images (default: bundled)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="Use only the first N images."),
    views: Optional[str] = typer.Option(None, "--views", help="Views of each image for feature sets with a head: full, flip, crop, crop-tl, crop-br. [default: full,flip,crop-tl,crop-br]"),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Seed for every seeded strategy and the shuffles. [default: 0]"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results, report and plots go here. [default: tokencomp-ablation]"),
    resume: bool = typer.Option(False, "--resume", help="Keep the finished cells in --out and run only the missing ones."),
    vlm: Optional[bool] = typer.Option(None, "--vlm/--no-vlm", help="Also run every strategy inside a tiny LLaVA (agreement, position bias, FlashAttention). [default: on]"),
) -> None:
    """Run the ablation grid on real image tokens (and inside a tiny VLM); print tables, write results,
    report.md and plots."""
    from tokencomp.analysis.ablation import (
        CLS_PROXY_NOTE,
        DEFAULT_GRIDS,
        configurations,
        make_tokens,
        run_ablation,
        runnable,
    )
    from tokencomp.analysis.report import write_report
    from tokencomp.analysis.results import cell_key, join_flash, load_results, row_key, save_results
    from tokencomp.data import bundled_images, load_image_folder
    from tokencomp.features import FEATURES, is_hf

    run: dict[str, Any] = {}  # what an interruption saves: target, rows, meta, cells finished since the last save
    given = {"strategies": strategies, "budgets": budgets, "features": features, "params": param or None,
             "images": images, "max_images": max_images, "views": views, "seed": seed, "out": out, "vlm": vlm}
    with _user_errors(on_interrupt=lambda: _interrupted(run)):
        from_file = _read_config(config) if config is not None else {}
        options = {k: given.get(k) if given.get(k) is not None else from_file.get(k, default)
                   for k, default in ABLATE_DEFAULTS.items()}
        options["out"] = Path(options["out"])
        options["images"] = Path(options["images"]) if options["images"] else None
        budget_list = _parse_budgets(str(options["budgets"]))
        feature_list = _split(str(options["features"]), "--features")
        for f in feature_list:
            if f not in FEATURES and not (is_hf(f) and len(f) > 3):
                raise UserError(f"--features: unknown {f!r}; allowed: {', '.join(FEATURES)} or hf:MODEL")
        view_list = _split(str(options["views"]), "--views")
        _strategy_names([str(options["focus"])])  # a config file's focus: a registered strategy
        run_vlm_too = bool(options["vlm"])
        notes: list[str] = []
        if options["strategies"] is None:
            names = list(tc.available())
        else:
            names = _strategy_names(_split(str(options["strategies"]), "--strategies"))
        image_names = [n for n in names if runnable(tc.get(n)) is None]
        for name in names:
            reason = runnable(tc.get(name))
            if reason is not None and not run_vlm_too:
                if options["strategies"] is not None:
                    raise UserError(f"cannot run {name!r} on image tokens: {reason}; drop --no-vlm to run it inside a VLM")
                console.print(f"[yellow]skipping[/] {name}: {reason}")
        specs = list(options["params"] or [])
        grids: dict[str, dict[str, list[Any]]] = {k: dict(v) for k, v in DEFAULT_GRIDS.items()} if not specs else {}
        for spec in specs:
            strat, key, values = _param_grid(spec)
            if strat not in names:
                raise UserError(f"--param {spec!r} names {strat!r}, which is not among the strategies run: {', '.join(names)}")
            if key in grids.get(strat, {}):
                raise UserError(f"--param {strat}.{key} is given twice; give its values once, as {strat}.{key}=V1,V2")
            grids.setdefault(strat, {})[key] = values
        image_configs = configurations(image_names, grids, options["seed"])
        # Inside the VLM: each strategy once at its defaults, unless a grid was given for it explicitly.
        vlm_configs = configurations(names, grids if specs else {}, options["seed"]) if run_vlm_too else []
        needing_cls = [n for n in image_names if "cls_attention" in tc.get(n).requires]
        if needing_cls and any(not is_hf(f) for f in feature_list):
            notes.append(f"{', '.join(needing_cls)} on efficientnet / pixels tokens: {CLS_PROXY_NOTE}")
            console.print(f"[yellow]note[/] for {', '.join(needing_cls)}: {CLS_PROXY_NOTE}")
        if run_vlm_too:
            notes.append(VLM_NOTE)
        target: Path = _output_folder(options["out"])
        picked = load_image_folder(options["images"]) if options["images"] is not None else bundled_images()
        if options["max_images"] is not None:
            picked = picked[: options["max_images"]]
        meta = _meta({**options, "budgets": budget_list, "features": feature_list, "views": view_list}, len(picked), notes)
        rows: list[dict[str, Any]] = []
        if resume and (target / "results.json").is_file():
            rows, old = load_results(target)
            differ = [k for k in ("seed", "images", "n_images", "views") if k in old and old[k] != meta[k]]
            if differ:
                raise UserError(
                    f"--resume: {str(target)!r} was run with different {', '.join(differ)} "
                    f"({', '.join(f'{k}={old[k]!r}' for k in differ)}); give the same options or another --out"
                )
            console.print(f"resuming: {len(rows)} finished cells in {target}")
        elif (target / "results.json").is_file():
            console.print(f"[yellow]note[/] replacing the results in {target} (--resume continues them instead)")
        done = {row_key(r) for r in rows if not r.get("skipped")}
        rows = [r for r in rows if row_key(r) in done]
        run.update(target=target, rows=rows, meta=meta, fresh=0)
        cells_per_set = [(f, [(n, p, b) for (n, p) in image_configs for b in budget_list if cell_key(f, n, p, b) not in done])
                         for f in feature_list]
        from tokencomp.analysis.vlm import budget_runs

        vlm_todo = [(n, p, b) for (n, base) in vlm_configs for p, _, b, _ in budget_runs(n, base, budget_list)
                    if cell_key(VLM_FEATURES, n, p, b) not in done]
        token_sets = []
        with console.status("extracting visual tokens..."):
            for f, todo in cells_per_set:
                if todo:
                    token_sets.append(make_tokens(f, picked, view_list))
        total = sum(len(t) for _, t in cells_per_set) + len(vlm_todo)
        last_save = [0.0]

        def saved(row: dict[str, Any]) -> None:
            rows.append(row)
            run["fresh"] += 1
            progress.advance(task)
            if time.monotonic() - last_save[0] > 5:
                save_results(target, rows, meta)
                run["fresh"] = 0
                last_save[0] = time.monotonic()

        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            task = progress.add_task("ablation", total=total)
            run_ablation(token_sets, image_configs, budget_list, on_cell=saved, done=done)
            if vlm_todo:
                from tokencomp.analysis.tiny_vlm import tiny_llava
                from tokencomp.analysis.vlm import run_vlm

                progress.update(task, description="inside a tiny LLaVA")
                model = tiny_llava(image_size=336, layers=32)
                run_vlm(model, [img for _, img in picked], vlm_configs, budget_list, seed=options["seed"],
                        on_cell=lambda c: saved(c.row(VLM_FEATURES)),
                        skip=lambda n, p, b: cell_key(VLM_FEATURES, n, p, b) in done)
        join_flash(rows)
        save_results(target, rows, meta)
        report = write_report(target, rows, meta, picked[0][1] if picked else None, focus=str(options["focus"]))
    _print_tables(rows)
    console.print(f"results written to {target / 'results.csv'} and {target / 'results.json'}; report: {report}")


@app.command("report")
def report_command(
    folder: Path = typer.Argument(..., help="A folder written by `tokencomp ablate --out`."),
    focus: Optional[str] = typer.Option(None, "--focus", help="Strategy compared with the references. [default: the run's, apet]"),
) -> None:
    """Re-render report.md and the plots of a finished ablation from its saved results."""
    from tokencomp.analysis.report import write_report
    from tokencomp.analysis.results import load_results

    with _user_errors():
        try:
            if focus is not None:
                _strategy_names([focus])
            rows, meta = load_results(folder)
            _output_folder(folder, "report folder")
            path = write_report(folder, rows, meta, _example_image(meta) if meta else None,
                                focus=focus or meta.get("focus", "apet"))
        except KeyError as exc:  # a row that passed the checks of load_results but lacks a field the report reads
            _fail(f"{str(folder / 'results.json')!r} is not a complete tokencomp results file: a row lacks {exc}; "
                  f"run `tokencomp ablate --out {folder}` again to rewrite it")
    _print_tables(rows)
    console.print(f"report: {path}")

@app.command("bench")
def bench_command(
    strategy: list[str] = typer.Option([], "--strategy", "-s", help="Strategy to time (repeatable). [default: all registered]"),
    shape: list[str] = typer.Option([], "--shape", help="B x N x D : K to time every strategy at (repeatable). [default: 16x576x1024:64 and 1x18432x1024:2304]"),
    frames: str = typer.Option("1,2,4,8,16,32", "--frames", help="Scaling curve: frames of 576 tokens (comma list; empty to skip)."),
    goals: bool = typer.Option(True, "--goals/--no-goals", help="Time ApET against the authors' procedure, LAPACK and the matmul floor."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed calls per figure (the fastest is reported)."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak memory (one extra call each)."),
    max_ms: float = typer.Option(20000.0, "--max-ms", min=1.0, help="Skip a strategy at a size where its scaling curve and complexity predict a longer call."),
    device: str = typer.Option("cpu", "--device", help="Device of the tokens (cpu, cuda, cuda:1, ...)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    out: Path = typer.Option(Path("tokencomp-bench"), "--out", "-o", help="Folder for the CSV tables and the scaling plot."),
) -> None:
    """Time every strategy's kernel and print ratios against references measured in the same run."""
    from tokencomp.analysis import bench

    with _user_errors():
        names = _strategy_names(strategy)
        shapes = [bench.BenchShape.parse(s) for s in (shape or bench.DEFAULT_SHAPES)]
        sizes = [_positive_int("--frames", v) for v in frames.split(",") if v.strip()]
        torch_dtype = _dtype(dtype)
        torch_device = _device(device)
        _output_folder(out)

    def write(name: str, rows: list[dict[str, Any]]) -> None:
        bench.write_csv(out / name, rows)

    if goals:
        references, found = bench.goals(repeats)
        write("references.csv", references)
        write("goals.csv", [{"goal": g.name, "ratio": g.ratio, "limit": g.limit, "met": g.met} for g in found])
        table = Table(title="ApET against its references (ratios measured in this run)")
        for column in ("goal", "measured", "limit", "met"):
            table.add_column(column)
        for g in found:
            table.add_row(g.name, f"{g.ratio:.3f}", f"{g.limit:g}", "[green]yes[/]" if g.met else "[red]no[/]")
        console.print(table)
        detail = Table(title="reference timings (ms, fastest call)")
        for column in ("shape", "reference", "ApET", "reference ms"):
            detail.add_column(column)
        for r in references:
            detail.add_row(r["shape"], r["reference"], f"{r['ours_ms']:.2f}", f"{r['reference_ms']:.2f}")
        console.print(detail)

    curve: list[dict[str, Any]] = []
    if sizes:
        curve = bench.scaling(names, frames=sizes, repeats=1, dtype=torch_dtype, device=torch_device,
                              memory=memory, max_ms=max_ms)
        summary = bench.scaling_summary(curve)
        write("scaling.csv", curve)
        write("scaling_summary.csv", summary)
        bench.plot_scaling(curve, out / "scaling.png")
        table = Table(title=f"scaling from {min(sizes) * bench.FRAME_TOKENS} to {max(sizes) * bench.FRAME_TOKENS} tokens (12.5 % kept)")
        for column in ("strategy", "complexity", "fitted slope", "within", "largest N", "peak x input"):
            table.add_column(column)
        for r in summary:
            within = "?" if r["ok"] is None else ("[green]yes[/]" if r["ok"] else "[red]no[/]")
            table.add_row(escape(r["strategy"]), r["complexity"], f"{r['slope']:.2f}", within, str(r["largest_n"]), f"{r['max_x_input']:.2f}")
        console.print(table)

    rows = []
    for s in shapes:
        for name in names:
            predicted = bench.predict_ms(curve, name, s)
            if predicted is not None and predicted > max_ms:
                console.print(f"[yellow]{name} at {s.label()} skipped:[/] predicted {predicted / 1e3:.0f} s per call "
                              f"from its scaling curve and complexity, over --max-ms", highlight=False)
                continue
            try:
                rows.append(bench.bench_strategy(name, s, repeats=repeats, dtype=torch_dtype, device=torch_device, memory=memory))
            except InputError as exc:  # a strategy that cannot keep this budget says why
                console.print(f"[yellow]{name} at {s.label()} skipped:[/] {exc}", highlight=False)
    write("strategies.csv", rows)
    table = Table(title="strategies (ms of the fastest call; ratio to one [B N, D] x [D, K] matmul; peak over input size)")
    for column in ("shape", "strategy", "ms", "x matmul", "peak MiB", "x input"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["shape"], r["strategy"], f"{r['ms']:.2f}", f"{r['x_matmul']:.2f}", f"{r['peak_mib']:.1f}", f"{r['x_input']:.2f}")
    console.print(table)
    console.print(f"tables and plot written to {out}")


def _strategy_names(given: list[str]) -> list[str]:
    """The registered names asked for (all when none), each checked to exist."""
    if not given:
        return tc.available()
    for name in given:
        try:
            tc.get(name)
        except UnknownStrategyError as exc:
            raise UserError(str(exc)) from None
    return list(dict.fromkeys(given))


def _positive_int(option: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{option}: {text!r} is not an integer; give a comma list of positive integers, e.g. 1,2,4") from None
    if value < 1:
        raise UserError(f"{option}: {value} must be >= 1")
    return value


def _dtype(text: str):
    import torch

    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if text not in allowed:
        raise UserError(f"--dtype {text!r} is not one of {', '.join(allowed)}")
    return allowed[text]


def _device(text: str):
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"--device {text!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {text!r}: CUDA is not available on this machine; use --device cpu")
    return device


@app.command("generate")
def generate_command(
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local folder of a supported VLM (from_pretrained)."),
    image: str = typer.Option(..., "--image", "-i", help="An image file, or a bundled image name (e.g. astronaut)."),
    prompt: str = typer.Option(..., "--prompt", help="The question."),
    strategy: str = typer.Option("apet", "--strategy", "-s", help="Registered strategy name."),
    budget: str = typer.Option("64", "--budget", "-b", help="Visual tokens kept (count or fraction)."),
    param: list[str] = typer.Option([], "--param", "-p", help="Strategy parameter P=V (repeatable)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    eager_fallback: bool = typer.Option(False, "--eager-fallback", help="Allow eager attention where the strategy reads weights."),
) -> None:
    """Answer with a real checkpoint, uncompressed and compressed, and show the token counts."""
    from tokencomp.analysis.ablation import parse_value
    from tokencomp.generate import build_inputs, compare_answers, load, load_image

    with _user_errors():
        (budget_value,) = _parse_budgets(budget)
        params: dict[str, Any] = {}
        for spec in param:
            key, sep, value = spec.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise UserError(f"--param {spec!r}: expected P=V with a name and a value, e.g. --param num_basis=8")
            params[key.strip()] = parse_value(value)
        tc.create(strategy, **params)  # validate before loading a large model
        picture = load_image(image)
        if not Path(model).exists() and "/" not in model:
            raise UserError(f"--model {model!r} is neither a local folder nor a hub id (owner/name)")
        processor, vlm = load(model)
        inputs = build_inputs(processor, picture, prompt)
        answers = compare_answers(vlm, processor, inputs, strategy, budget_value, params, max_new_tokens, eager_fallback)
    table = Table(title=f"{model}: {prompt}")
    for column in ("run", "prompt tokens", "visual tokens in -> out", "seconds", "answer"):
        table.add_column(column, overflow="fold")
    for a in answers:
        table.add_row(a.label, str(a.prompt_tokens), f"{a.visual_tokens_in} -> {a.visual_tokens_out}", f"{a.seconds:.2f}", a.text)
    console.print(table)


# PyTorch's profiler (the peak-memory measurements of bench and ablate) logs two "USDT ... profiler_start /
# profiler_stop" lines per measurement through Kineto; above its last level (5) Kineto logs nothing. Set
# for the tokencomp program only, and only where the user has not chosen a level.
_KINETO_QUIET = "6"


def main() -> None:
    """Entry point of the ``tokencomp`` script."""
    os.environ.setdefault("KINETO_LOG_LEVEL", _KINETO_QUIET)
    app()


if __name__ == "__main__":
    main()
