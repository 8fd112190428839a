"""Checks of user input that raise errors saying what was given, what is allowed and how to fix it.

The parameter checks here are :func:`tokencomp.constraints.validate` on one constraint, for code that
checks a value outside a strategy's ``parameter_constraints``."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Optional, Union

import torch

from .constraints import Boolean, Interval, IsNone, Options, validate
from .errors import InputError

__all__ = [
    "check_bool",
    "check_budget",
    "check_choice",
    "check_finite",
    "check_fits",
    "check_float",
    "check_int",
    "check_seed",
    "check_tokens",
    "resolve_budget",
]


# a seed: None (fresh randomness each call) or a non-negative integer
SEED = (IsNone(), Interval(int, 0))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise :class:`InvalidParameterError`."""
    return validate(owner, name, value, (Options(tuple(choices)),))


def check_int(owner: str, name: str, value: Any, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """Return ``value`` as ``int`` if it is an integer in ``[low, high]``."""
    return validate(owner, name, value, (Interval(int, low, high),))


def check_float(
    owner: str,
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` as ``float`` if it is a finite real number in the given range."""
    closed = {(True, True): "both", (True, False): "left", (False, True): "right", (False, False): "neither"}
    return validate(owner, name, value, (Interval(float, low, high, closed[low_inclusive, high_inclusive]),))


def check_bool(owner: str, name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool``."""
    return validate(owner, name, value, (Boolean(),))


def check_seed(owner: str, name: str, value: Any) -> Optional[int]:
    """Return ``value`` if it is ``None`` (fresh randomness each call) or an integer >= 0."""
    return validate(owner, name, value, SEED)


def all_finite(values: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN and no infinity, in one cheap pass.

    A NaN or infinite value makes the sum NaN or infinite, so a finite sum settles it without the
    full-size temporaries of ``torch.isfinite(values).all()``. A non-finite sum of finite values
    (overflow, common in half precision) is settled by the exact test: the minimum and maximum are
    NaN if any value is, and infinite if any value is.
    """
    if values.numel() == 0 or bool(torch.isfinite(values.sum())):
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(values))).all())


def check_tokens(owner: str, tokens: Any, finite: bool = True) -> tuple[torch.Tensor, bool]:
    """Validate visual tokens and return them batched ``[B, N, D]`` with a flag for unbatched input.

    With ``finite=False`` the values are not read (the caller checks them with :func:`check_finite`).

    Raises
    ------
    ValueError
        If ``tokens`` is not a floating-point tensor of 2 or 3 dimensions with ``N >= 1`` and
        ``D >= 1`` and (with ``finite``) only finite values, or requires grad with autograd on.
    """
    if not isinstance(tokens, torch.Tensor):
        raise InputError(
            f"{owner}: tokens must be a torch.Tensor of shape [B, N, D] or [N, D]; got {type(tokens).__name__}."
        )
    if not tokens.is_floating_point():
        raise InputError(
            f"{owner}: tokens must have a floating-point dtype; got {tokens.dtype}. "
            "Convert them first, e.g. tokens.float()."
        )
    if tokens.requires_grad and torch.is_grad_enabled():
        raise InputError(
            f"{owner}: tokens require grad and autograd is on; token compression does not support gradients. "
            "Run it in torch.no_grad() or torch.inference_mode() (under tokencomp.apply: the model's forward or "
            "generate)."
        )
    if tokens.dim() not in (2, 3):
        raise InputError(
            f"{owner}: tokens must have shape [B, N, D] or [N, D]; got {tuple(tokens.shape)} "
            f"({tokens.dim()} dimensions)."
        )
    unbatched = tokens.dim() == 2
    batched = tokens.unsqueeze(0) if unbatched else tokens
    if batched.shape[1] < 1 or batched.shape[2] < 1 or batched.shape[0] < 1:
        raise InputError(f"{owner}: tokens must have B, N, D >= 1; got shape {tuple(tokens.shape)}.")
    if finite:
        check_finite(owner, batched)
    return batched, unbatched


def check_finite(owner: str, tokens: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``tokens`` hold a NaN or an infinity (one pass, :func:`all_finite`)."""
    if not all_finite(tokens):
        raise InputError(f"{owner}: tokens contain NaN or infinite values; only finite values can be compressed.")


def check_budget(owner: str, budget: Any) -> Union[int, float]:
    """Return ``budget`` as ``int`` (tokens kept, >= 1) or ``float`` (fraction kept, in ``(0, 1]``).

    The form of a budget, checked before the number of tokens is known (by :func:`tokencomp.apply`
    before it installs a hook, and by :func:`resolve_budget`).

    Raises
    ------
    ValueError
        For any other value: ``"<owner>: budget must be an int >= 1 (tokens kept) or a float in (0, 1]
        (fraction kept); got <budget>."``.
    """
    if _is_int(budget) and budget >= 1:
        return int(budget)
    if isinstance(budget, numbers.Real) and not _is_int(budget) and not isinstance(budget, bool):
        fraction = float(budget)
        if math.isfinite(fraction) and 0.0 < fraction <= 1.0:
            return fraction
    raise InputError(
        f"{owner}: budget must be an int >= 1 (tokens kept) or a float in (0, 1] (fraction kept); got {budget!r}"
        + (f" of type {type(budget).__name__}." if not isinstance(budget, numbers.Real) else ".")
    )


def check_fits(owner: str, budget: Any, n: int, where: str = "the input", unit: str = "input") -> None:
    """Raise ``ValueError`` when an int ``budget`` keeps more than the ``n`` visual tokens ``where`` has.

    Fractions (and anything that is no int) always fit; their form is :func:`check_budget`'s.

    Parameters
    ----------
    owner : str
        Who asks, for the message (the strategy, or ``tokencomp.apply`` and the strategy).
    budget : Any
        The budget.
    n : int
        Visual tokens of the item.
    where : str
        Which item, e.g. ``"image 1 (batch row 0)"``.
    unit : str
        What an int budget counts tokens of (``"input"``, ``"image"``, ``"frame"``, ``"prompt row"``).
    """
    if not _is_int(budget) or int(budget) <= n:
        return
    raise InputError(
        f"{owner}: budget {int(budget)} is out of range for {where}, which has only {n} visual tokens; an int "
        f"budget is the number of tokens kept per {unit}, so it must be in [1, {n}] here. Pass an int budget <= "
        f"{n}, or a fraction in (0, 1] (e.g. budget=0.25) to keep a share of each {unit}."
    )


def resolve_budget(owner: str, budget: Any, n: int) -> int:
    """Turn a budget into the number ``K`` of tokens kept out of ``n``.

    Parameters
    ----------
    owner : str
        Name used in error messages (the strategy).
    budget : int or float
        ``int >= 1``: number of tokens kept. ``float`` in ``(0, 1]``: fraction of ``n`` kept,
        ``K = max(1, round(budget * n))`` (Python's ``round``, halves to even).
    n : int
        Number of input tokens.

    Raises
    ------
    ValueError
        For any other value (:func:`check_budget`), or when ``K > n`` (:func:`check_fits`).
    """
    value = check_budget(owner, budget)
    if isinstance(value, float):
        return max(1, round(value * n))
    check_fits(owner, value, n)
    return value
