"""The saved form of an ablation: ``results.json`` (every field), ``results.csv`` (the flat columns) and
``run.json`` (what was run), written atomically, read back for ``--resume`` and ``tokencomp report``."""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, TypedDict

import torch

from tokencomp.errors import InputError

__all__ = [
    "COLUMNS",
    "EAGER_KEYS",
    "REQUIRED_KEYS",
    "Row",
    "cell_key",
    "flash_measurements",
    "join_flash",
    "load_results",
    "mean_ci",
    "row_key",
    "save_results",
    "write_atomic",
]

# What eager attention cost against SDPA for a strategy that needs it (a row's largest measured shape).
EAGER_KEYS = ("eager_ms", "sdpa_ms", "eager_peak_mib", "sdpa_peak_mib")


class Row(TypedDict, total=False):
    """One cell of the grid as saved: the one row type of the image ablation and the in-model runner.

    ``features``, ``strategy``, ``params``, ``budget``, ``kept`` and ``n_images`` are in every row
    (:data:`REQUIRED_KEYS`); the metrics a producer does not measure are absent. ``results.csv`` holds the
    flat fields in this order (:data:`COLUMNS`), ``results.json`` every field.
    """

    features: str
    strategy: str
    params: dict[str, Any] | str  # a JSON object, as a string once saved
    budget: int | float | None  # None: the strategy's own per-layer schedule
    kept: float
    n_images: int
    # inside mini-llava (tokencomp.analysis.vqa): scenes questions answered
    n_questions: int
    accuracy: float
    accuracy_ci95: float
    accuracy_uncompressed: float
    relative_accuracy: float
    relative_accuracy_ci95: float
    prefill_ms: float
    prefill_ms_uncompressed: float
    prefill_ratio: float
    recon_error: float
    recon_error_ci95: float
    lstsq_error: float
    lstsq_error_ci95: float
    pred_agreement: float
    pred_agreement_ci95: float
    pred_kl: float
    pred_kl_ci95: float
    pred_agreement_unweighted: float
    pred_kl_unweighted: float
    next_token_agreement: float
    next_token_agreement_ci95: float
    logit_kl: float
    logit_kl_ci95: float
    position_bias: float
    flash_compatible: Optional[bool]
    flash_error: str
    eager_ms: Optional[float]
    sdpa_ms: Optional[float]
    eager_peak_mib: Optional[float]
    sdpa_peak_mib: Optional[float]
    time_ms: float
    skipped: str
    # results.json only
    grid: Optional[list[int]]
    flash_measured: bool  # measured inside a VLM (the others take that strategy's measurement)
    heatmap: Optional[list[float]]  # share of images keeping each position
    example_kept: Optional[list[int]]  # the first image's kept positions
    per_image: dict[str, list[float]]
    eager_cost: dict[str, dict[str, Any]]  # per attention shape measured
    accuracy_by_type: dict[str, dict[str, float]]  # per question type: accuracy, accuracy_uncompressed, n
    cell_accuracy: dict[str, list[float]]  # per scenes grid cell: accuracy, accuracy_uncompressed, n
    replies: list[str]  # mini-llava's reply to each question


_JSON_ONLY = (
    "grid",
    "flash_measured",
    "heatmap",
    "example_kept",
    "per_image",
    "eager_cost",
    "accuracy_by_type",
    "cell_accuracy",
    "replies",
)
# results.csv columns, in order.
COLUMNS = tuple(k for k in Row.__annotations__ if k not in _JSON_ONLY)


def mean_ci(values: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and 95 % confidence half-width ``1.96 sd / sqrt(n)`` (NaN for a single value)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = v.numel()
    ci = float(1.96 * v.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return float(v.mean()), ci


def cell_key(features: str, strategy: str, params: dict[str, Any] | str, budget: Any) -> tuple[str, str, str, str]:
    """What identifies a cell of the grid: features, strategy, params (JSON) and budget (JSON)."""
    params = params if isinstance(params, str) else json.dumps(params, sort_keys=True)
    return features, strategy, params, json.dumps(budget)


def row_key(row: dict[str, Any]) -> tuple[str, str, str, str]:
    """:func:`cell_key` of a results row."""
    return cell_key(row["features"], row["strategy"], row["params"], row["budget"])


def flash_measurements(rows: list[dict[str, Any]]) -> dict[str, tuple[list[dict[str, Any]], Optional[dict[str, Any]]]]:
    """Per strategy measured inside a VLM (sorted by name): its runs that were not skipped, and the first
    of them that failed under the forced FLASH_ATTENTION backend (``None`` when every run worked).
    A strategy whose runs were all skipped has an empty list."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("flash_measured"):
            runs.setdefault(r["strategy"], [])
            if not r.get("skipped"):
                runs[r["strategy"]].append(r)
    return {
        name: (ran, next((r for r in ran if not r["flash_compatible"]), None)) for name, ran in sorted(runs.items())
    }


def join_flash(rows: list[dict[str, Any]]) -> None:
    """Give every row of a strategy the FlashAttention measurement made for it inside a VLM (in place).

    A strategy is FlashAttention-compatible when every run of it inside the VLM worked under the forced
    FLASH_ATTENTION backend without eager attention; rows of a strategy never run in a VLM keep ``None``.
    """
    measured = flash_measurements(rows)
    for r in rows:
        runs, failed = measured.get(r["strategy"], ([], None))
        if runs and not r.get("flash_measured"):
            r["flash_compatible"] = failed is None
            r["flash_error"] = failed["flash_error"] if failed else ""
            for k in EAGER_KEYS:
                r[k] = failed[k] if failed else None


def _clean(value: Any) -> Any:
    """JSON-safe: NaN becomes ``None``."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, renamed into place when complete."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make every result file private
        with os.fdopen(fd, "w", newline="") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_results(out: Path, rows: Iterable[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Write ``results.json``, ``results.csv`` and ``run.json`` to ``out``, each atomically."""
    rows = [
        _clean(
            {**r, "params": r["params"] if isinstance(r["params"], str) else json.dumps(r["params"], sort_keys=True)}
        )
        for r in rows
    ]

    def write_csv(fh):
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})

    write_atomic(out / "results.json", lambda fh: json.dump(rows, fh, indent=1))
    write_atomic(out / "results.csv", write_csv)
    write_atomic(out / "run.json", lambda fh: json.dump(_clean(meta), fh, indent=1))


# Keys every results row holds (both the image ablation's and the VLM's); a file without them is not ours.
REQUIRED_KEYS = ("features", "strategy", "params", "budget", "kept", "n_images")


def _read_json(path: Path, folder: Path) -> Any:
    """The JSON value in ``path``; a ``ValueError`` naming the file when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{str(path)!r} is not a tokencomp results file: it is not valid JSON ({exc}); "
            f"run `tokencomp ablate --out {folder}` again to rewrite it"
        ) from None


def _check_rows(rows: Any, path: Path) -> None:
    """Raise ``ValueError`` unless ``rows`` is a list of dicts holding :data:`REQUIRED_KEYS`."""
    expected = f"expected a list of rows with {', '.join(REQUIRED_KEYS)}, as `tokencomp ablate` writes"
    if not isinstance(rows, list):
        raise InputError(f"{str(path)!r} is not a tokencomp results file: it holds a {type(rows).__name__}; {expected}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(
                f"{str(path)!r} is not a tokencomp results file: row {i} is a {type(row).__name__}; {expected}"
            )
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise InputError(
                f"{str(path)!r} is not a tokencomp results file: row {i} lacks {', '.join(missing)}; {expected}"
            )
        if (
            not isinstance(row["features"], str)
            or not isinstance(row["strategy"], str)
            or not isinstance(row["params"], (str, dict))
        ):
            raise InputError(
                f"{str(path)!r} is not a tokencomp results file: row {i} has features {row['features']!r}, strategy "
                f"{row['strategy']!r}, params {row['params']!r}; features and strategy must be strings, params a "
                "JSON object"
            )
        budget = row["budget"]
        if isinstance(budget, bool) or not (budget is None or isinstance(budget, (int, float))):
            raise InputError(
                f"{str(path)!r}: row {i} has budget {budget!r}; a budget is a number (a count or a fraction) or "
                f"null (the strategy's own schedule). Fix or delete the row, or run `tokencomp ablate` again"
            )
    keys: dict[Any, int] = {}
    for i, row in enumerate(rows):
        key = row_key(row)
        if key in keys:
            raise InputError(
                f"{str(path)!r}: rows {keys[key]} and {i} are the same cell ({row['features']}, {row['strategy']} "
                f"{row['params']}, budget {row['budget']}); a results file holds each cell once. Delete one of "
                "them, or run `tokencomp ablate` again"
            )
        keys[key] = i


def load_results(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of ``out/results.json`` and the metadata of ``out/run.json``.

    Raises
    ------
    FileNotFoundError
        ``out`` holds no ``results.json`` (say which folder, and how to make one).
    ValueError
        A file is not JSON, the rows are not a list of result rows (each holding :data:`REQUIRED_KEYS`),
        or ``run.json`` is not a JSON object.
    """
    path = Path(out) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; run `tokencomp ablate --out {out}` first")
    rows = _read_json(path, Path(out))
    _check_rows(rows, path)
    meta_path = Path(out) / "run.json"
    meta = _read_json(meta_path, Path(out)) if meta_path.is_file() else {}
    if not isinstance(meta, dict):
        raise InputError(
            f"{str(meta_path)!r} is not a tokencomp run file: it holds a {type(meta).__name__}, not a JSON object; "
            f"run `tokencomp ablate --out {out}` again to rewrite it"
        )
    return rows, meta
