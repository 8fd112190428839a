"""Checking an int budget against the visual tokens of one image, video, frame or prompt row."""

from __future__ import annotations

import numbers
from typing import Any

from tokencomp.errors import InputError

from ..base import Compressor


def check_fits(compressor: Compressor, budget: Any, n: int, where: str, unit: str = "image") -> None:
    """Raise a ``ValueError`` when an int ``budget`` keeps more tokens than the ``n`` that ``where`` has.

    Parameters
    ----------
    compressor : Compressor
        The strategy (named in the message).
    budget : Any
        The budget given to :func:`tokencomp.apply`; fractions and per-layer schedules always fit.
    n : int
        Visual tokens of the item.
    where : str
        Which item, e.g. ``"image 1 (batch row 0)"``.
    unit : str
        What an int budget counts tokens of (``"image"``, ``"frame"``, ``"prompt row"``).

    Raises
    ------
    ValueError
        ``budget`` is an int larger than ``n``.
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or int(budget) <= n:
        return
    raise InputError(
        f"tokencomp.apply: {compressor.display_name()!r} budget {int(budget)} is out of range for {where}, which has "
        f"only {n} visual tokens; an int budget is the number of tokens kept per {unit}, so it must be at most "
        f"{n} here. Pass an int budget <= {n}, or a fraction in (0, 1] (e.g. budget=0.25) to keep a share of each "
        f"{unit}."
    )
