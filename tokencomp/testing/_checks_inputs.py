"""Checks that a caller's mistakes are refused: bad budgets, tokens, parameters, missing context."""

from __future__ import annotations

from ..base import Compressor
from ..constraints import describe, invalid_values
from ..errors import InvalidParameterError
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
        corrupt = x.clone()
        corrupt[0, 0, 0] = value
        non_finite.append(corrupt)
    for bad in (x.long(), x[0, 0], x.unsqueeze(0), *non_finite, x.numpy()):
        shape = getattr(bad, "shape", None)
        _assert_refused(compressor, f"bad tokens of shape {shape}", compressor.compress, bad, 4, ctx)


def _check_unknown_parameter(compressor: Compressor) -> None:
    """:func:`tokencomp.create` refuses a parameter the registered strategy does not take, naming it."""
    _assert_refused(
        compressor,
        "an unknown parameter to create()",
        create,
        compressor.name,
        not_a_parameter=1,
        naming="not_a_parameter",
    )


def check_bad_parameters(compressor: Compressor) -> None:
    """Every parameter is declared in ``parameter_constraints`` and refuses what they do not allow.

    :func:`tokencomp.create` refuses a parameter the strategy does not take and lists those it takes.
    Each parameter must have constraints (:mod:`tokencomp.constraints`); every value
    :func:`~tokencomp.constraints.invalid_values` derives from them (just outside each range or set,
    the wrong type, NaN, an arbitrary object) raises :class:`~tokencomp.InvalidParameterError` with
    the one message, ``"<strategy>: parameter '<name>' must be <what is allowed>; got <value>."``.
    """
    cls, who = type(compressor), repr(compressor)
    params = compressor.get_params()
    if not compressor.name and not params:
        raise SkipCheck("unregistered and takes no parameters")
    if compressor.name:
        _check_unknown_parameter(compressor)
    undeclared = [name for name in params if name not in cls.parameter_constraints]
    assert not undeclared, (
        f"{who}: parameter(s) {', '.join(map(repr, undeclared))} have no entry in "
        f"{cls.__qualname__}.parameter_constraints; declare what each allows, e.g. "
        f"parameter_constraints = {{{undeclared[0]!r}: (Interval(int, 1),)}} (tokencomp.constraints)."
    )
    owner = compressor.display_name()
    for name in params:
        constraints = cls.parameter_constraints[name]
        for bad in invalid_values(constraints):
            expected = f"{owner}: parameter {name!r} must be {describe(constraints)}; got {bad!r}."
            try:
                cls(**{**params, name: bad})
            except InvalidParameterError as exc:
                assert str(exc).startswith(expected), f"{who}: {name}={bad!r} raised {exc!s}; expected {expected}"
            except Exception as exc:  # noqa: BLE001 - any other exception type is the failure reported
                raise AssertionError(
                    f"{who}: {name}={bad!r} raised {type(exc).__name__} instead of InvalidParameterError: {exc}"
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
