"""Checks shared by the integrations: the context a strategy needs against the context an integration
supplies. (A budget against the visual tokens of an image, frame or prompt row is
:func:`tokencomp.validation.check_fits`, the rule the core applies too.)"""

from __future__ import annotations

from typing import Any

from tokencomp.errors import InputError

from ..base import Compressor
from ..validation import check_fits as fits


def check_fits(compressor: Compressor, budget: Any, n: int, where: str, unit: str = "image") -> None:
    """:func:`tokencomp.validation.check_fits` on behalf of :func:`tokencomp.apply` and ``compressor``."""
    fits(apply_owner(compressor), budget, n, where, unit)


def apply_owner(compressor: Compressor) -> str:
    """Who a model integration's messages come from: ``tokencomp.apply: '<strategy>'``."""
    return f"tokencomp.apply: {compressor.display_name()!r}"


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
