"""Checks that a caller's mistakes are refused: bad budgets, tokens, parameters, missing context."""

from __future__ import annotations

from ..base import Compressor
from ..registry import create
from ._calls import some_budgets
from ._data import N, make_context, make_tokens
from ._skip import SkipCheck


def _assert_refused(compressor: Compressor, what: str, call, *args, naming: str | None = None, **kwargs) -> None:
    """``call(*args, **kwargs)`` must raise ``ValueError`` for ``what``, naming ``naming`` in its message
    when given."""
    try:
        call(*args, **kwargs)
    except ValueError as exc:
        if naming is not None:
            assert naming in str(exc), f"{compressor!r}: the error for {what} does not name {naming!r}: {exc}"
    else:
        raise AssertionError(f"{compressor!r}: {what} was accepted")


def check_bad_budgets(compressor: Compressor) -> None:
    """Budgets that are 0, negative, above N, non-numeric or fractions outside (0, 1] raise ValueError."""
    x = make_tokens()
    ctx = make_context(compressor, x)
    owner = compressor.display_name()
    for bad in (0, -1, N + 1, 0.0, -0.5, 1.5, float("nan"), "8", None, True, [8]):
        _assert_refused(compressor, f"budget {bad!r}", compressor.compress, x, bad, ctx, naming=owner)


def check_bad_tokens(compressor: Compressor) -> None:
    """Integer, 1-D, 4-D and non-finite (NaN, ``+inf``, ``-inf``) tokens raise ValueError."""
    x = make_tokens()
    ctx = make_context(compressor, x)
    non_finite = []
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = x.clone()
        bad[0, 0, 0] = value
        non_finite.append(bad)
    for bad in (x.long(), x[0, 0], x.unsqueeze(0), *non_finite, x.numpy()):
        shape = getattr(bad, "shape", None)
        _assert_refused(compressor, f"bad tokens of shape {shape}", compressor.compress, bad, 4, ctx)


def _check_unknown_parameter(compressor: Compressor) -> None:
    """:func:`tokencomp.create` refuses a parameter the registered strategy does not take, naming it."""
    _assert_refused(compressor, "an unknown parameter to create()", create, compressor.name, not_a_parameter=1,
                    naming="not_a_parameter")


def _bad_values(value) -> list:
    """Values a parameter whose valid value is ``value`` must refuse."""
    bad_values: list = [object(), float("nan")]
    if isinstance(value, (str, list, tuple)):
        bad_values.append("no-such-choice")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        bad_values.append(-1)  # every count, layer, ratio, ridge and seed here is non-negative
    return bad_values


def check_bad_parameters(compressor: Compressor) -> None:
    """Unknown parameters and values of the wrong type or out of range raise ``ValueError`` naming them.

    :func:`tokencomp.create` refuses a parameter the strategy does not take and lists those it takes.
    Every parameter refuses an arbitrary object, NaN, ``-1`` when its value is a non-negative number,
    and a string that is no valid choice when its value is a string or a list; the message names the
    parameter.
    """
    cls, who = type(compressor), repr(compressor)
    params = compressor.get_params()
    if not compressor.name and not params:
        raise SkipCheck("unregistered and takes no parameters")
    if compressor.name:
        _check_unknown_parameter(compressor)
    for name, value in params.items():
        for bad in _bad_values(value):
            try:
                cls(**{**params, name: bad})
            except ValueError as exc:
                assert name in str(exc), f"{who}: the error for {name}={bad!r} does not name {name!r}: {exc}"
            except Exception as exc:  # noqa: BLE001 - any other exception type is the failure reported
                raise AssertionError(
                    f"{who}: {name}={bad!r} raised {type(exc).__name__} instead of ValueError: {exc}"
                ) from exc
            else:
                raise AssertionError(f"{who}: accepted {name}={bad!r}")


def check_missing_context(compressor: Compressor) -> None:
    """Each required context field, when missing, raises a ValueError naming it."""
    if not compressor.requires:
        raise SkipCheck("requires no context field")
    x = make_tokens()
    full = make_context(compressor, x)
    k = some_budgets(compressor)[-1]
    for name in compressor.requires:
        partial = full.replace(**{name: None})
        _assert_refused(compressor, f"missing context.{name}", compressor.compress, x, k, partial, naming=name)
