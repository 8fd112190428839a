"""``tokencomp ablate``'s options, merged once: flags > ``--config`` TOML > defaults.

The defaults are the analysis's own (:mod:`tokencomp.analysis.grid`); only where the results go and
whether mini-llava runs are the command line's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tokencomp.analysis import grid

from . import _parse
from ._app import UserError

__all__ = ["ABLATE_DEFAULTS", "AblateOptions", "read_config"]


def _comma(values: tuple[Any, ...]) -> str:
    return ",".join(str(v) for v in values)


# The options a --config TOML file may set (its keys), with their defaults in the flags' syntax.
ABLATE_DEFAULTS: dict[str, Any] = {
    "strategies": None,  # every registered strategy that can run
    "budgets": _comma(grid.DEFAULT_BUDGETS),
    "features": _comma(grid.DEFAULT_FEATURES),
    "params": None,  # grid.DEFAULT_GRIDS
    "images": None,  # the bundled photographs
    "max_images": None,
    "views": _comma(grid.DEFAULT_VIEWS),
    "seed": grid.DEFAULT_SEED,
    "out": "tokencomp-ablation",
    "vlm": True,
    "questions": grid.DEFAULT_QUESTIONS,
    "focus": grid.DEFAULT_FOCUS,
}


@dataclass(frozen=True)
class AblateOptions:
    """The checked options of one ``tokencomp ablate`` run.

    ``strategies`` is ``None`` when none were named (then every registered one runs, and one that
    cannot run on image tokens is skipped with a note instead of refused); ``params`` are grid specs
    ``STRATEGY.PARAM=V1,V2`` (empty: the default grids).
    """

    strategies: Optional[list[str]]
    budgets: list[int | float]
    features: list[str]
    params: list[str]
    images: Optional[Path]
    max_images: Optional[int]
    views: list[str]
    seed: int
    out: Path
    vlm: bool
    questions: int
    focus: str

    @classmethod
    def merge(cls, flags: dict[str, Any], config: Optional[Path]) -> AblateOptions:
        """The flags given (``None`` where not given) over ``config``'s values over the defaults, checked."""
        from_file = read_config(config) if config is not None else {}
        raw = {
            key: flags[key] if flags.get(key) is not None else from_file.get(key, default)
            for key, default in ABLATE_DEFAULTS.items()
        }
        return cls(
            budgets=_parse.budgets(str(raw["budgets"])),
            features=_features(str(raw["features"])),
            views=_views(str(raw["views"])),
            focus=_parse.strategy_names([str(raw["focus"])])[0],
            strategies=None
            if raw["strategies"] is None
            else _parse.strategy_names(_parse.comma_list(str(raw["strategies"]), "--strategies")),
            params=list(raw["params"] or []),
            images=_parse.path_value(raw["images"], "images") if raw["images"] is not None else None,
            max_images=_parse.positive_int(raw["max_images"], "max_images") if raw["max_images"] is not None else None,
            seed=_parse.seed(raw["seed"]),
            out=_parse.path_value(raw["out"], "out"),
            vlm=_parse.boolean(raw["vlm"], "vlm"),
            questions=_parse.positive_int(raw["questions"], "questions"),
        )


def _features(text: str) -> list[str]:
    from tokencomp.analysis.features import FEATURES, is_hf

    names = _parse.comma_list(text, "--features")
    for f in names:
        if f not in FEATURES and not (is_hf(f) and len(f) > 3):
            raise UserError(f"--features: unknown {f!r}; allowed: {', '.join(FEATURES)} or hf:MODEL")
    return names


def _views(text: str) -> list[str]:
    """The views, checked whatever the feature sets (``pixels`` alone does not read them)."""
    names = _parse.comma_list(text, "--views")
    unknown = [v for v in names if v not in grid.VIEWS]
    if unknown:
        raise UserError(f"--views: unknown {', '.join(map(repr, unknown))}; allowed: {', '.join(grid.VIEWS)}")
    return names


def _grid_specs(value: Any) -> list[str]:
    """``[params.NAME]`` tables (``basis = ["fps", "qr"]``) as ``NAME.basis=fps,qr`` specs."""
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise UserError(
            f'--config: \'params\' must be tables like [params.apet] with basis = ["fps", "qr"]; got {value!r}'
        )
    return [
        f"{s}.{p}=" + ",".join(x if isinstance(x, str) else json.dumps(x) for x in (v if isinstance(v, list) else [v]))
        for s, grid_ in value.items()
        for p, v in grid_.items()
    ]


def read_config(path: Path) -> dict[str, Any]:
    """A TOML file of ``tokencomp ablate`` options in the flags' syntax; lists may be TOML arrays;
    ``[params.NAME]`` tables give parameter grids."""
    # tomllib is Python 3.11+: on 3.10 (requires-python) --config fails here; mypy checks as 3.10
    import tomllib  # type: ignore[import-not-found, unused-ignore]

    if not path.is_file():
        raise UserError(f"--config {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--config {str(path)!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(ABLATE_DEFAULTS))
    if unknown:
        raise UserError(
            f"--config {str(path)!r}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(ABLATE_DEFAULTS)}"
        )
    return {
        key: _grid_specs(value)
        if key == "params"
        else ",".join(str(v) for v in value)
        if isinstance(value, list)
        else value
        for key, value in data.items()
    }
