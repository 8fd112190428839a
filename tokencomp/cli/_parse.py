"""Parsing and checking option values; every failure is a :class:`~tokencomp.cli._app.UserError`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import tokencomp as tc
from tokencomp.errors import UnknownStrategyError

from ._app import UserError

__all__ = [
    "boolean",
    "budgets",
    "path_value",
    "positive_int",
    "seed",
    "comma_list",
    "device",
    "dtype",
    "output_folder",
    "param_grid",
    "positive_ints",
    "strategy_names",
]


def comma_list(text: str, what: str) -> list[str]:
    """The non-empty items of a comma-separated list; an empty list, or an item given twice, is refused."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{what} is empty; give a comma-separated list")
    _once(items, what)
    return items


def _once(values: list[Any], what: str) -> None:
    """Refuse a value given twice: it would run twice and count as two independent samples."""
    seen: list[Any] = []
    for v in values:
        if any(v == s and type(v) is type(s) for s in seen):
            raise UserError(f"{what}: {v!r} is given twice; give each value once")
        seen.append(v)


def budgets(text: str) -> list[int | float]:
    """``--budgets``: counts (``64``) or fractions (``0.25``)."""
    out: list[int | float] = []
    for item in comma_list(text, "--budgets"):
        try:
            out.append(int(item))
        except ValueError:
            try:
                out.append(float(item))
            except ValueError:
                raise UserError(
                    f"--budgets: {item!r} is not a number; use counts like 64 or fractions like 0.25"
                ) from None
    _once(out, "--budgets")
    return out


def positive_ints(option: str, text: str) -> list[int]:
    """A comma list of integers >= 1 (an empty list is allowed: it skips what the option drives)."""
    values = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise UserError(
                f"{option}: {item!r} is not an integer; give a comma list of positive integers, e.g. 1,2,4"
            ) from None
        if value < 1:
            raise UserError(f"{option}: {value} must be >= 1")
        values.append(value)
    return values


# The flags check their own types; what reaches these checks with the wrong type came from a --config file.
def positive_int(value: Any, key: str) -> int:
    """One integer >= 1 (a TOML string, float or boolean is refused, not coerced)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"--{key.replace('_', '-')} / config {key} = {value!r}: give an integer >= 1, e.g. {key} = 2")
    return value


def seed(value: Any) -> int:
    """A seed: an integer in [0, 2**63) (what torch's generators take)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise UserError(f"--seed / config seed = {value!r}: give an integer in [0, 2**63), e.g. seed = 0")
    return value


def boolean(value: Any, key: str) -> bool:
    """A flag's or TOML file's true / false (a TOML string such as "no" is refused, not coerced)."""
    if not isinstance(value, bool):
        raise UserError(f"--config: {key} = {value!r} is not a boolean; write {key} = true or {key} = false")
    return value


def path_value(value: Any, key: str) -> Path:
    """A non-empty path (a TOML number or an empty string is refused)."""
    if not isinstance(value, (str, Path)) or not str(value).strip():
        example = {"out": "results", "images": "photos"}.get(key, "folder")
        raise UserError(f'--{key} / config {key} = {value!r}: give a folder path, e.g. {key} = "{example}"')
    return Path(value)


def output_folder(path: Path, option: str = "--out") -> Path:
    """``path`` created (with its parents) and checked by writing a temporary file in it.

    Raises
    ------
    UserError
        ``path`` is a file, cannot be created, or files cannot be written in it.
    """
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


def param_grid(spec: str) -> tuple[str, str, list[Any]]:
    """``--param STRATEGY.PARAM=V1,V2`` as ``(strategy, param, values)``; empty values are refused."""
    from tokencomp.analysis.ablation import parse_param

    strategy, key, values = parse_param(spec)
    if any(v == "" for v in values):
        raise UserError(
            f"malformed parameter grid {spec!r}: it has an empty value; expected STRATEGY.PARAM=V1,V2,... "
            "e.g. apet.basis=fps,qr,random"
        )
    _once(values, f"--param {strategy}.{key}")
    return strategy, key, values


def strategy_names(given: list[str]) -> list[str]:
    """The registered names asked for (all when none), each checked to exist, duplicates dropped."""
    if not given:
        return tc.available()
    for name in given:
        try:
            tc.get(name)
        except UnknownStrategyError as exc:
            raise UserError(str(exc)) from None
    return list(dict.fromkeys(given))


def dtype(text: str) -> Any:
    """``--dtype``: a floating torch dtype by name."""
    import torch

    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if text not in allowed:
        raise UserError(f"--dtype {text!r} is not one of {', '.join(allowed)}")
    return allowed[text]


def device(text: str) -> Any:
    """``--device``: a torch device that exists on this machine."""
    import torch

    try:
        found = torch.device(text)
    except RuntimeError:
        raise UserError(f"--device {text!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if found.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {text!r}: CUDA is not available on this machine; use --device cpu")
    return found
