"""``tokencomp ablate``: the grid of strategies x parameters x budgets on real image tokens and inside
mini-llava answering ``scenes`` questions, saved as it runs, then tables, ``report.md`` and plots."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import tokencomp as tc
from tokencomp.analysis.grid import VIEWS

from . import _parse, _render
from ._app import UserError, console, say, user_errors
from ._autosave import Autosave, interrupted
from ._options import ABLATE_DEFAULTS, AblateOptions

__all__ = ["ablate_command"]


@dataclass
class Plan:
    """What runs: the configurations on image tokens and inside the VLM, and the notes for the report."""

    image_configs: list[tuple[str, dict[str, Any]]]
    vlm_configs: list[tuple[str, dict[str, Any]]]
    notes: list[str] = field(default_factory=list)


def _grids(specs: list[str], names: list[str]) -> dict[str, dict[str, list[Any]]]:
    """The parameter grids: ``--param`` specs when given (each for a strategy that runs, once), else the defaults."""
    from tokencomp.analysis.grid import DEFAULT_GRIDS

    if not specs:
        return {k: dict(v) for k, v in DEFAULT_GRIDS.items()}
    grids: dict[str, dict[str, list[Any]]] = {}
    for spec in specs:
        strat, key, values = _parse.param_grid(spec)
        if strat not in names:
            raise UserError(
                f"--param {spec!r} names {strat!r}, which is not among the strategies run: {', '.join(names)}"
            )
        if key in grids.get(strat, {}):
            raise UserError(f"--param {strat}.{key} is given twice; give its values once, as {strat}.{key}=V1,V2")
        grids.setdefault(strat, {})[key] = values
    return grids


def _image_strategies(options: AblateOptions, names: list[str]) -> list[str]:
    """The strategies that run on image tokens; the others are refused, or noted when none were named."""
    from tokencomp.analysis.ablation import runnable

    for name in names:
        reason = runnable(tc.get(name))
        if reason is not None and not options.vlm:
            if options.strategies is not None:
                raise UserError(f"cannot run {name!r} on image tokens: {reason}; drop --no-vlm to run it inside a VLM")
            say(f"[yellow]skipping[/] {name}: {reason}")
    return [n for n in names if runnable(tc.get(n)) is None]


def plan(options: AblateOptions) -> Plan:
    """The configurations ``options`` ask for, with the notes the report carries about them."""
    from tokencomp.analysis.ablation import CLS_PROXY_NOTE, configurations

    names = options.strategies if options.strategies is not None else list(tc.available())
    image_names = _image_strategies(options, names)
    grids = _grids(options.params, names)
    # Inside the VLM: each strategy once at its defaults, unless a grid was given for it explicitly.
    vlm_grids = grids if options.params else {}
    found = Plan(
        configurations(image_names, grids, options.seed),
        configurations(names, vlm_grids, options.seed) if options.vlm else [],
    )
    needing_cls = [n for n in image_names if "cls_attention" in tc.get(n).requires]
    if needing_cls and any(f in ("efficientnet", "pixels") for f in options.features):
        found.notes.append(f"{', '.join(needing_cls)} on efficientnet / pixels tokens: {CLS_PROXY_NOTE}")
        say(f"[yellow]note[/] for {', '.join(needing_cls)}: {CLS_PROXY_NOTE}")
    if options.vlm:
        from tokencomp.analysis.vqa import NOTE

        found.notes.append(NOTE)
    return found


def _meta(options: AblateOptions, n_images: int, notes: list[str]) -> dict[str, Any]:
    """``run.json``: the versions, the options and the notes of this run."""
    import torch
    import transformers

    return {
        "date": datetime.date.today().isoformat(),
        "tokencomp": tc.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": options.seed,
        "images": str(options.images) if options.images else "bundled",
        "n_images": n_images,
        "max_images": options.max_images,
        "views": options.views,
        "budgets": options.budgets,
        "features": options.features,
        "vlm": options.vlm,
        "questions": options.questions,
        "focus": options.focus,
        "notes": notes,
    }


def _images(options: AblateOptions) -> list[tuple[str, Any]]:
    from tokencomp.analysis.data import bundled_images, load_image_folder

    picked = load_image_folder(options.images) if options.images is not None else bundled_images()
    return picked if options.max_images is None else picked[: options.max_images]


def _finished(target: Path, meta: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
    """The finished rows in ``target`` when resuming a run of the same images, views and seed; else none."""
    from tokencomp.analysis.results import load_results, row_key

    if not (target / "results.json").is_file():
        return []
    if not resume:
        say(f"[yellow]note[/] replacing the results in {target} (--resume continues them instead)")
        return []
    rows, old = load_results(target)
    differ = [k for k in ("seed", "images", "n_images", "views", "questions") if k in old and old[k] != meta[k]]
    if differ:
        raise UserError(
            f"--resume: {str(target)!r} was run with different {', '.join(differ)} "
            f"({', '.join(f'{k}={old[k]!r}' for k in differ)}); give the same options or another --out"
        )
    say(f"resuming: {len(rows)} finished cells in {target}")
    done = {row_key(r) for r in rows if not r.get("skipped")}
    return [r for r in rows if row_key(r) in done]


def _run(options: AblateOptions, found: Plan, picked: list[tuple[str, Any]], saver: Autosave) -> None:
    """Every cell of ``found`` not in ``saver.rows``, on image tokens, then inside mini-llava."""
    from tokencomp.analysis.ablation import make_tokens, run_ablation
    from tokencomp.analysis.results import cell_key, row_key
    from tokencomp.analysis.vlm import budget_runs
    from tokencomp.analysis.vqa import VQA_FEATURES

    done = {row_key(r) for r in saver.rows}
    todo = {
        f: sum(cell_key(f, n, p, b) not in done for (n, p) in found.image_configs for b in options.budgets)
        for f in options.features
    }
    vlm_todo = [
        (n, p, b)
        for (n, base) in found.vlm_configs
        for p, _, b, _ in budget_runs(n, base, options.budgets)
        if cell_key(VQA_FEATURES, n, p, b) not in done
    ]
    with console.status("extracting visual tokens..."):
        token_sets = [make_tokens(f, picked, options.views) for f in options.features if todo[f]]
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("ablation", total=sum(todo.values()) + len(vlm_todo))

        def add(row: dict[str, Any]) -> None:
            saver.add(row)
            progress.advance(task)

        run_ablation(token_sets, found.image_configs, options.budgets, on_cell=add, done=done)
        if vlm_todo:
            from tokencomp.analysis.vqa import default_bench, run_vqa

            progress.update(task, description="mini-llava: loading, uncompressed answers")
            bench = default_bench(options.questions)
            progress.update(task, description="mini-llava on scenes")
            run_vqa(
                bench,
                found.vlm_configs,
                options.budgets,
                on_cell=add,
                skip=lambda n, p, b: cell_key(VQA_FEATURES, n, p, b) in done,
            )


# "[default: ...]" for each option's help, from the one table of defaults.
_DEFAULT = {key: f"[default: {value}]" for key, value in ABLATE_DEFAULTS.items()}


def ablate_command(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="A TOML file of these options (flags given here win)."
    ),
    strategies: Optional[str] = typer.Option(
        None, "--strategies", "-s", help="Comma-separated strategy names (default: every registered one that can run)."
    ),
    budgets: Optional[str] = typer.Option(
        None, "--budgets", "-b", help=f"Comma-separated budgets (counts or fractions). {_DEFAULT['budgets']}"
    ),
    features: Optional[str] = typer.Option(
        None,
        "--features",
        "-f",
        help=f"efficientnet, pixels, dinov2 and/or hf:MODEL (a CLIP / SigLIP / DINOv2 / ViT tower). "
        f"{_DEFAULT['features']}",
    ),
    param: Optional[list[str]] = typer.Option(
        None, "--param", "-p", help="Parameter grid STRATEGY.PARAM=V1,V2 (repeatable); replaces the default grid."
    ),
    images: Optional[str] = typer.Option(None, "--images", help="A folder of your own images (default: bundled)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="Use only the first N images."),
    views: Optional[str] = typer.Option(
        None,
        "--views",
        help=f"Views of each image for feature sets with a head: {', '.join(VIEWS)}. {_DEFAULT['views']}",
    ),
    seed: Optional[int] = typer.Option(
        None, "--seed", min=0, help=f"Seed for every seeded strategy and the shuffles. {_DEFAULT['seed']}"
    ),
    out: Optional[str] = typer.Option(  # a str: typer makes '' Path('.'), which path_value cannot refuse
        None, "--out", "-o", help=f"Results, report and plots go here. {_DEFAULT['out']}"
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Keep the finished cells in --out and run only the missing ones."
    ),
    vlm: Optional[bool] = typer.Option(
        None,
        "--vlm/--no-vlm",
        help="Also run every strategy inside mini-llava answering scenes questions (accuracy, agreement, "
        "FlashAttention). [default: on]",
    ),
    questions: Optional[int] = typer.Option(
        None,
        "--questions",
        "-q",
        min=1,
        help="scenes test questions mini-llava answers per cell (in-LLM and text-conditioned strategies: fewer). "
        f"{_DEFAULT['questions']}",
    ),
) -> None:
    """Run the ablation grid on real image tokens and inside mini-llava; print tables, write results,
    report.md and plots."""
    from tokencomp.analysis.report import write_report
    from tokencomp.analysis.results import join_flash

    flags = {
        "strategies": strategies,
        "budgets": budgets,
        "features": features,
        "params": param or None,
        "images": images,
        "max_images": max_images,
        "views": views,
        "seed": seed,
        "out": out,
        "vlm": vlm,
        "questions": questions,
    }
    saver: list[Autosave] = []  # what Ctrl-C saves, once the run has one
    with user_errors(on_interrupt=lambda: interrupted(saver[0] if saver else None)):
        options = AblateOptions.merge(flags, config)
        found = plan(options)
        target = _parse.output_folder(options.out)
        picked = _images(options)
        meta = _meta(options, len(picked), found.notes)
        saver.append(Autosave(target, _finished(target, meta, resume), meta))
        _run(options, found, picked, saver[0])
        join_flash(saver[0].rows)
        saver[0].save()
        report = write_report(target, saver[0].rows, meta, picked[0][1] if picked else None, focus=options.focus)
    _render.ablation_tables(saver[0].rows)
    console.print(f"results written to {target / 'results.csv'} and {target / 'results.json'}; report: {report}")
