"""Checks shared by the integrations: an int budget against the visual tokens of one image, video, frame
or prompt row, and the context a strategy needs against the context an integration supplies."""

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


def check_supplied(compressor: Compressor, supplied: tuple[str, ...], by: str, note: str = "") -> None:
    """Raise ``InputError`` when ``compressor`` requires context that ``by`` does not supply.

    Parameters
    ----------
    compressor : Compressor
        The strategy (its ``requires``).
    supplied : tuple of str
        The :class:`~tokencomp.Context` fields the integration computes.
    by : str
        The integration, for the message (e.g. ``"in-LLM integration"``).
    note : str
        Why a field is missing, appended to the list of supplied ones.
    """
    missing = [f for f in compressor.requires if f not in supplied]
    if missing:
        raise InputError(
            f"tokencomp.apply: strategy {compressor.display_name()!r} needs context {', '.join(missing)}, which the "
            f"{by} does not supply (it supplies {', '.join(supplied)}{note}); choose a strategy that needs only those."
        )
