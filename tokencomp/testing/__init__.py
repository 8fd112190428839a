"""Conformance checks every strategy must pass, in the manner of scikit-learn's ``check_estimator``.

>>> import tokencomp as tc
>>> from tokencomp.testing import check_compressor
>>> skipped = check_compressor(tc.create("random"))
>>> [name for name, reason in skipped]
['check_batch_rows_independent', 'check_missing_context']

Each check is a plain function ``check(compressor)`` that raises ``AssertionError`` with a message on
failure, or :class:`SkipCheck` with the reason when it does not apply to that compressor (it is then
neither passed nor failed); :func:`all_checks` lists them, :func:`parametrize_with_checks` parametrises
a pytest test over compressors x checks, and :func:`check_compressor` runs them all and returns the
checks it skipped with their reasons.

A check that compares two results of a randomised strategy (``deterministic = False``) built with
``seed=None`` passes each call a fresh ``Context.generator`` seeded with 0, so the two calls draw the
same random numbers (as scikit-learn's checks pin ``random_state``). A seeded strategy is run as it is.

The kit is a package with one job per module: ``_data`` (the inputs: :func:`make_tokens`,
:func:`make_context`, the degenerate and padded examples), ``_calls`` (budgets, fresh instances,
pinned random numbers), ``_asserts`` (:func:`assert_result_valid`, the one validity check every check
uses), the checks by theme (``_checks_api``, ``_checks_inputs``, ``_checks_batching``,
``_checks_degenerate``) and ``_pytest`` (:func:`parametrize_with_checks`).
"""

from __future__ import annotations

from typing import Callable, Iterator

from ..base import Compressor
from ._asserts import assert_result_valid
from ._calls import valid_budgets
from ._checks_api import (
    check_dtype_and_device,
    check_float_budget,
    check_get_params_roundtrip,
    check_keep_all,
    check_no_host_sync,
    check_seeded_determinism,
    check_shapes_and_indices,
)
from ._checks_batching import check_batch_rows_independent, check_padded_batch, check_unbatched
from ._checks_degenerate import (
    check_extreme_magnitudes,
    check_identical_tokens,
    check_rank_deficient,
    check_single_token,
    check_zero_tokens,
)
from ._checks_inputs import check_bad_budgets, check_bad_parameters, check_bad_tokens, check_missing_context
from ._data import make_context, make_tokens
from ._pytest import parametrize_with_checks
from ._skip import SkipCheck

__all__ = [
    "SkipCheck",
    "all_checks",
    "assert_result_valid",
    "check_bad_budgets",
    "check_bad_parameters",
    "check_bad_tokens",
    "check_batch_rows_independent",
    "check_compressor",
    "check_dtype_and_device",
    "check_extreme_magnitudes",
    "check_float_budget",
    "check_get_params_roundtrip",
    "check_identical_tokens",
    "check_keep_all",
    "check_missing_context",
    "check_no_host_sync",
    "check_padded_batch",
    "check_rank_deficient",
    "check_seeded_determinism",
    "check_shapes_and_indices",
    "check_single_token",
    "check_unbatched",
    "check_zero_tokens",
    "make_context",
    "make_tokens",
    "parametrize_with_checks",
    "valid_budgets",
]

_CHECKS: tuple[Callable[[Compressor], None], ...] = (
    check_shapes_and_indices,
    check_float_budget,
    check_dtype_and_device,
    check_unbatched,
    check_seeded_determinism,
    check_batch_rows_independent,
    check_get_params_roundtrip,
    check_bad_budgets,
    check_bad_tokens,
    check_bad_parameters,
    check_missing_context,
    check_keep_all,
    check_no_host_sync,
    check_identical_tokens,
    check_zero_tokens,
    check_rank_deficient,
    check_single_token,
    check_extreme_magnitudes,
    check_padded_batch,
)


def all_checks() -> Iterator[Callable[[Compressor], None]]:
    """The conformance checks, each a function of a compressor that may raise :class:`SkipCheck`."""
    return iter(_CHECKS)


def check_compressor(compressor: Compressor) -> list[tuple[str, str]]:
    """Run every conformance check on ``compressor``; raise ``AssertionError`` on the first failure.

    Returns the checks that do not apply to ``compressor`` (they raised :class:`SkipCheck`) as
    ``(check name, reason)`` pairs, in the order of :func:`all_checks`; they are not passed.
    """
    if not isinstance(compressor, Compressor):
        raise TypeError(f"check_compressor expects a tokencomp.Compressor instance; got {type(compressor).__name__}")
    skipped = []
    for check in _CHECKS:
        try:
            check(compressor)
        except SkipCheck as exc:
            skipped.append((check.__name__, str(exc)))
    return skipped
