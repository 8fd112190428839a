"""``tokencomp generate``: a real checkpoint's answer, uncompressed and compressed, with the token counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

import tokencomp as tc

from . import _parse, _render
from ._app import UserError, user_errors

__all__ = ["generate_command"]


def _params(specs: list[str]) -> dict[str, Any]:
    """``--param P=V`` specs as keyword parameters (values parsed as the grids parse them)."""
    from tokencomp.analysis.ablation import parse_value

    params: dict[str, Any] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"--param {spec!r}: expected P=V with a name and a value, e.g. --param num_basis=8")
        params[key.strip()] = parse_value(value)
    return params


def generate_command(
    model: str = typer.Option(
        ..., "--model", "-m", help="Hub id or local folder of a supported VLM (from_pretrained)."
    ),
    image: str = typer.Option(..., "--image", "-i", help="An image file, or a bundled image name (e.g. astronaut)."),
    prompt: str = typer.Option(..., "--prompt", help="The question."),
    strategy: str = typer.Option("apet", "--strategy", "-s", help="Registered strategy name."),
    budget: str = typer.Option("64", "--budget", "-b", help="Visual tokens kept (count or fraction)."),
    param: list[str] = typer.Option([], "--param", "-p", help="Strategy parameter P=V (repeatable)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    eager_fallback: bool = typer.Option(
        False, "--eager-fallback", help="Allow eager attention where the strategy reads weights."
    ),
) -> None:
    """Answer with a real checkpoint, uncompressed and compressed, and show the token counts."""
    from tokencomp.analysis.generate import build_inputs, compare_answers, load, load_image

    with user_errors():
        (budget_value,) = _parse.budgets(budget)
        params = _params(param)
        tc.create(strategy, **params)  # validate before loading a large model
        picture = load_image(image)
        if not Path(model).exists() and "/" not in model:
            raise UserError(f"--model {model!r} is neither a local folder nor a hub id (owner/name)")
        processor, vlm = load(model)
        inputs = build_inputs(processor, picture, prompt)
        answers = compare_answers(
            vlm, processor, inputs, strategy, budget_value, params, max_new_tokens, eager_fallback
        )
    _render.generate_answers(f"{model}: {prompt}", answers)
