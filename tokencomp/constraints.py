"""Parameter constraints as data: what a strategy parameter allows, in one message format.

A strategy declares ``parameter_constraints = {"name": (Constraint, ...), ...}`` on its class; a value
is valid when any of the name's constraints accepts it. :class:`~tokencomp.Compressor` validates the
declared parameters before ``__init__`` runs (converting numbers to ``int`` / ``float``),
``tc.register`` checks the declaration against ``__init__``, and the conformance suite derives the
values each parameter must refuse from the same constraints (:func:`invalid_values`). Every refusal
reads ``"<strategy>: parameter '<name>' must be <description>; got <value>."`` (:func:`validate`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Union

from .errors import InvalidParameterError

__all__ = [
    "COMPUTE_DTYPE",
    "COMPUTE_DTYPES",
    "OUTPUT_ORDER",
    "Boolean",
    "Constraint",
    "Interval",
    "IsNone",
    "ListOf",
    "Options",
    "describe",
    "invalid_values",
    "validate",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Constraint:
    """One kind of value a parameter allows."""

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        raise NotImplementedError

    def convert(self, value: Any) -> Any:
        """The stored form of an accepted ``value`` (``int`` / ``float`` for numbers)."""
        return value

    def describe(self) -> str:
        """What is allowed, as the end of "must be ..."."""
        raise NotImplementedError

    def near_misses(self) -> tuple[Any, ...]:
        """Values just outside this constraint (the conformance suite keeps those no constraint accepts)."""
        raise NotImplementedError


@dataclass(frozen=True)
class IsNone(Constraint):
    """``None``: the parameter's "off" or "automatic" value."""

    def accepts(self, value: Any) -> bool:
        return value is None

    def describe(self) -> str:
        return "None"

    def near_misses(self) -> tuple[Any, ...]:
        return ("None", 0)


@dataclass(frozen=True)
class Boolean(Constraint):
    """``True`` or ``False`` (not ``0`` / ``1``)."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "True or False"

    def near_misses(self) -> tuple[Any, ...]:
        return (1, 0, "True", None)


@dataclass(frozen=True)
class Interval(Constraint):
    """An integer (``kind=int``) or finite real number (``kind=float``) in a range.

    ``low`` / ``high`` of ``None`` leave that side open-ended; ``closed`` says which ends belong to it.
    """

    kind: type
    low: Optional[float] = None
    high: Optional[float] = None
    closed: str = "both"

    def __post_init__(self) -> None:
        if self.kind not in (int, float):
            raise TypeError(f"Interval kind must be int or float; got {self.kind!r}.")
        if self.closed not in ("both", "left", "right", "neither"):
            raise TypeError(f"Interval closed must be 'both', 'left', 'right' or 'neither'; got {self.closed!r}.")

    def _in_range(self, value: float) -> bool:
        left = self.closed in ("both", "left")
        right = self.closed in ("both", "right")
        if self.low is not None and not (value >= self.low if left else value > self.low):
            return False
        return self.high is None or (value <= self.high if right else value < self.high)

    def accepts(self, value: Any) -> bool:
        if self.kind is int:
            return _is_int(value) and self._in_range(value)
        return _is_real(value) and math.isfinite(value) and self._in_range(value)

    def convert(self, value: Any) -> Any:
        return self.kind(value)

    def describe(self) -> str:
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        show = str if self.kind is int else repr
        lo = "-inf" if self.low is None else show(self.kind(self.low))
        hi = "inf" if self.high is None else show(self.kind(self.high))
        what = "an integer" if self.kind is int else "a finite number"
        return f"{what} in {left}{lo}, {hi}{right}"

    def near_misses(self) -> tuple[Any, ...]:
        step = 1 if self.kind is int else 0.5
        edges = []
        if self.low is not None:
            edges.append(self.low - step if self.closed in ("both", "left") else self.low)
        if self.high is not None:
            edges.append(self.high + step if self.closed in ("both", "right") else self.high)
        inside = self.low if self.low is not None else (self.high if self.high is not None else 0)
        misses: list[Any] = [self.kind(e) for e in edges]
        misses += [True, str(inside), float("nan"), float("inf")]
        if self.kind is int:
            misses.append(float(inside) + 0.5)
        return tuple(misses)


@dataclass(frozen=True)
class Options(Constraint):
    """One of a fixed set of values (strings, or integers such as an authors' table of settings)."""

    values: tuple[Any, ...]
    hint: str = ""

    def _same_kind(self, value: Any, option: Any) -> bool:
        return type(value) is type(option) or (_is_int(value) and _is_int(option))

    def accepts(self, value: Any) -> bool:
        return any(self._same_kind(value, o) and value == o for o in self.values)

    def convert(self, value: Any) -> Any:
        return int(value) if _is_int(value) else value

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)

    def near_misses(self) -> tuple[Any, ...]:
        first = self.values[0]
        if isinstance(first, str):
            return ("no-such-choice", first.upper() if first.upper() != first else first + "x", 1)
        return (max(self.values) + 1, str(first), float(first) + 0.5, True)


@dataclass(frozen=True)
class ListOf(Constraint):
    """A non-empty list (or tuple) of values each allowed by ``item``, optionally strictly increasing."""

    item: Constraint
    increasing: bool = False

    def accepts(self, value: Any) -> bool:
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            return False
        items = list(value)
        if not items or not all(self.item.accepts(v) for v in items):
            return False
        return not self.increasing or all(b > a for a, b in zip(items, items[1:]))

    def convert(self, value: Any) -> Any:
        return [self.item.convert(v) for v in value]

    def describe(self) -> str:
        order = ", strictly increasing" if self.increasing else ""
        item = self.item.describe()
        for single, plural in (("an integer", "integers"), ("a finite number", "finite numbers")):
            if item.startswith(single):
                return f"a non-empty{order} list of {plural}{item[len(single) :]}"
        return f"a non-empty{order} list, each item {item}"

    def near_misses(self) -> tuple[Any, ...]:
        good = _an_accepted(self.item)
        misses: list[Any] = [[], "[]", good]
        misses += [[m] for m in self.item.near_misses()]
        if self.increasing and good is not None:
            misses.append([good, good])
        return tuple(misses)


# The ``compute_dtype`` parameter shared by the strategies whose authors compute in the model's half
# precision: "float32" (the default) computes in float32 whatever the inputs' dtype, "input" in the inputs'
# own dtype, which reproduces the authors' arithmetic when the model runs float16 or bfloat16.
COMPUTE_DTYPES = ("float32", "input")
COMPUTE_DTYPE = Options(
    COMPUTE_DTYPES,
    hint="'float32' computes in float32 whatever the inputs' dtype (deterministic selections); 'input' computes "
    "in the inputs' own dtype, as the authors' code does in a float16 / bfloat16 model.",
)


def _an_accepted(constraint: Constraint) -> Any:
    """A value ``constraint`` accepts, for building lists of it (``None`` when none is at hand)."""
    if isinstance(constraint, Interval):
        if constraint.low is not None:
            value = constraint.low if constraint.closed in ("both", "left") else constraint.low + 1
        else:
            value = 0
        return constraint.kind(value) if constraint.accepts(constraint.kind(value)) else None
    if isinstance(constraint, Options):
        return constraint.values[0]
    if isinstance(constraint, Boolean):
        return True
    return None


Constraints = tuple[Constraint, ...]
ParameterConstraints = dict[str, Constraints]


def describe(constraints: Union[Constraints, list]) -> str:
    """What a parameter with these constraints allows: their descriptions joined by "or"."""
    return " or ".join(c.describe() for c in constraints)


def validate(owner: str, name: str, value: Any, constraints: Union[Constraints, list]) -> Any:
    """Return ``value`` in its stored form if any constraint accepts it, else raise the one message.

    Raises
    ------
    tokencomp.errors.InvalidParameterError
        ``"<owner>: parameter '<name>' must be <describe(constraints)>; got <value>."``, followed by
        the hint of an :class:`Options` constraint when it has one.
    """
    for constraint in constraints:
        if constraint.accepts(value):
            return constraint.convert(value)
    hints = " ".join(c.hint for c in constraints if isinstance(c, Options) and c.hint)
    raise InvalidParameterError(
        f"{owner}: parameter {name!r} must be {describe(constraints)}; got {value!r}." + (f" {hints}" if hints else "")
    )


def invalid_values(constraints: Union[Constraints, list]) -> list[Any]:
    """Values no constraint accepts, from each constraint's near misses and a few foreign objects."""
    candidates: list[Any] = [object(), float("nan"), None, "no-such-choice"]
    for constraint in constraints:
        candidates.extend(constraint.near_misses())
    refused: list[Any] = []
    for value in candidates:
        if not any(c.accepts(value) for c in constraints) and not any(_same(value, r) for r in refused):
            refused.append(value)
    return refused


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects whose == is not a bool are simply different
        return False


# The ``order`` parameter of a strategy whose authors feed the language model another order than
# position order (VisionZip, PruMerge); such a strategy's ``output_order`` is ``"strategy"`` under
# ``"authors"``.
OUTPUT_ORDER = Options(
    ("authors", "position"),
    hint="'authors' gives the language model the authors' sequence, 'position' ascending original position.",
)
