"""The ``tokencomp`` command line: ``ls`` and ``ablate``."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import tokencomp as tc

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
    columns = ("name", "stage", "needs attention", "FlashAttention", "text", "deterministic", "needs context", "summary")
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
            cls.summary,
        )
    console.print(table)


def strategy_markdown() -> str:
    """The registry as a Markdown table: name, paper, stage, needs attention, FlashAttention, summary."""
    lines = [
        "| name | paper | stage | needs attention | FlashAttention / SDPA | summary |",
        "|---|---|---|---|---|---|",
    ]
    for name in tc.available():
        cls = tc.get(name)
        cells = [f"`{name}`", cls.paper or "(reference)", cls.stage, "yes" if cls.needs_attention else "no",
                 cls.flash_attention(), cls.summary]
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


def _label(name: str, params: dict[str, Any]) -> str:
    defaults = tc.get(name)().get_params() if not tc.get(name)._param_names() else None
    shown = {k: v for k, v in params.items() if k != "seed"}
    if defaults is not None or not shown:
        return name
    return name + " " + " ".join(f"{k}={v}" for k, v in shown.items())


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save(out: Path, rows: list[dict[str, Any]]) -> None:
    def write_csv(fh):
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    _write_atomic(out / "results.csv", write_csv)
    _write_atomic(out / "results.json", lambda fh: json.dump(rows, fh, indent=1))


def _print_tables(cells, budgets) -> None:
    metrics = [
        ("recon_error", "recon_error_ci", "reconstruction error relative to the uncompressed tokens", "lower", min),
        ("pred_agreement", "pred_agreement_ci", "top-1 agreement of the ImageNet head on the pooled tokens "
         "(outputs weighted by the inputs they stand for) with the uncompressed tokens", "higher", max),
        ("pred_kl", "pred_kl_ci", "KL(full || compressed) of the ImageNet head's prediction on the pooled "
         "tokens, nats", "lower", min),
        ("position_bias", None, "position bias: Wasserstein distance of kept positions from uniform after "
         "shuffling the contents (0 = position-blind)", "lower", min),
    ]
    for features in dict.fromkeys(c.features for c in cells):
        subset = [c for c in cells if c.features == features]
        for attr, ci_attr, title, better, pick in metrics:
            if all(math.isnan(getattr(c, attr)) for c in subset):
                continue
            table = Table(
                title=f"{title} ({features}, {subset[0].n_images} images{', mean ± 95% CI' if ci_attr else ''}; "
                f"{better} is better)",
                title_justify="left",
            )
            table.add_column("strategy")
            for budget in budgets:
                kept = next(c.kept for c in subset if c.budget == budget)
                table.add_column(f"keep {kept}", justify="right")
            best = {b: pick(getattr(c, attr) for c in subset if c.budget == b) for b in budgets}
            for key in dict.fromkeys((c.strategy, json.dumps(c.params, sort_keys=True)) for c in subset):
                row = [c for c in subset if (c.strategy, json.dumps(c.params, sort_keys=True)) == key]
                cellmap = {c.budget: c for c in row}
                values = []
                for budget in budgets:
                    c = cellmap[budget]
                    text = f"{getattr(c, attr):.4f}" + (f" ± {getattr(c, ci_attr):.4f}" if ci_attr else "")
                    values.append(f"[bold green]{text}[/]" if getattr(c, attr) == best[budget] else text)
                table.add_row(_label(row[0].strategy, row[0].params), *values)
            console.print(table)


@app.command("ablate")
def ablate_command(
    strategies: Optional[str] = typer.Option(
        None, "--strategies", "-s", help="Comma-separated strategy names (default: every one the image data can run)."
    ),
    budgets: str = typer.Option("64,128,192", "--budgets", "-b", help="Comma-separated budgets (counts or fractions)."),
    features: str = typer.Option("efficientnet,pixels", "--features", "-f", help="efficientnet and/or pixels."),
    param: list[str] = typer.Option(
        [], "--param", "-p", help="Parameter grid STRATEGY.PARAM=V1,V2 (repeatable); replaces the default grid."
    ),
    images: Optional[Path] = typer.Option(None, "--images", help="A folder of your own images (default: bundled)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="Use only the first N images."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for every seeded strategy."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write results.csv and results.json here."),
) -> None:
    """Run the ablation grid on real image tokens and print retention tables."""
    from tokencomp.analysis.ablation import (
        CLS_PROXY_NOTE,
        DEFAULT_GRIDS,
        configurations,
        make_tokens,
        parse_param,
        run_ablation,
        runnable,
    )
    from tokencomp.data import bundled_images, load_image_folder
    from tokencomp.features import FEATURES

    try:
        budget_list = _parse_budgets(budgets)
        feature_list = _split(features, "--features")
        for f in feature_list:
            if f not in FEATURES:
                raise UserError(f"--features: unknown {f!r}; allowed: {', '.join(FEATURES)}")
        if strategies is None:
            names = []
            for name in tc.available():
                reason = runnable(tc.get(name))
                if reason is None:
                    names.append(name)
                else:
                    console.print(f"[yellow]skipping[/] {name}: {reason}")
        else:
            names = _split(strategies, "--strategies")
            for name in names:
                tc.get(name)
                reason = runnable(tc.get(name))
                if reason is not None:
                    raise UserError(f"cannot run {name!r} here: {reason}")
        grids: dict[str, dict[str, list[Any]]] = {k: dict(v) for k, v in DEFAULT_GRIDS.items()} if not param else {}
        for spec in param:
            strat, key, values = parse_param(spec)
            if strat not in names:
                raise UserError(f"--param {spec!r} names {strat!r}, which is not among the strategies run: {', '.join(names)}")
            grids.setdefault(strat, {})[key] = values
        configs = configurations(names, grids, seed)
        needing_cls = [n for n in names if "cls_attention" in tc.get(n).requires]
        if needing_cls:
            console.print(f"[yellow]note[/] for {', '.join(needing_cls)}: {CLS_PROXY_NOTE}")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if not os.access(out, os.W_OK):
                raise UserError(f"--out {str(out)!r} is not writable")
        picked = load_image_folder(images) if images is not None else bundled_images()
        if max_images is not None:
            picked = picked[:max_images]
        token_sets = []
        with console.status("extracting visual tokens..."):
            for f in feature_list:
                token_sets.append(make_tokens(f, picked))
        total = len(token_sets) * len(configs) * len(budget_list)
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            task = progress.add_task("ablation", total=total)
            cells = run_ablation(token_sets, configs, budget_list, on_cell=lambda c: progress.advance(task))
    except UserError as exc:
        _fail(str(exc))
    except KeyError as exc:
        _fail(str(exc.args[0]) if exc.args else str(exc))
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    _print_tables(cells, budget_list)
    if out is not None:
        _save(out, [c.row() for c in cells])
        console.print(f"results written to {out / 'results.csv'} and {out / 'results.json'}")


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

    try:
        (budget_value,) = _parse_budgets(budget)
        params: dict[str, Any] = {}
        for spec in param:
            key, sep, value = spec.partition("=")
            if not sep or not key.strip():
                raise UserError(f"--param {spec!r}: expected P=V, e.g. --param num_basis=8")
            params[key.strip()] = parse_value(value)
        tc.create(strategy, **params)  # validate before loading a large model
        picture = load_image(image)
        if not Path(model).exists() and "/" not in model:
            raise UserError(f"--model {model!r} is neither a local folder nor a hub id (owner/name)")
        processor, vlm = load(model)
        inputs = build_inputs(processor, picture, prompt)
        answers = compare_answers(vlm, processor, inputs, strategy, budget_value, params, max_new_tokens, eager_fallback)
    except UserError as exc:
        _fail(str(exc))
    except KeyError as exc:
        _fail(str(exc.args[0]) if exc.args else str(exc))
    except (ValueError, OSError, TypeError) as exc:
        _fail(str(exc))
    table = Table(title=f"{model}: {prompt}")
    for column in ("run", "prompt tokens", "visual tokens in -> out", "seconds", "answer"):
        table.add_column(column, overflow="fold")
    for a in answers:
        table.add_row(a.label, str(a.prompt_tokens), f"{a.visual_tokens_in} -> {a.visual_tokens_out}", f"{a.seconds:.2f}", a.text)
    console.print(table)


def main() -> None:
    """Entry point of the ``tokencomp`` script."""
    app()


if __name__ == "__main__":
    main()
