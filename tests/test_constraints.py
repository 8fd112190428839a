"""tokencomp.constraints: descriptions, acceptance, conversion and the derived invalid values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tokencomp as tc
from tokencomp.constraints import Boolean, Interval, IsNone, ListOf, Options, describe, invalid_values, validate

SEED = (IsNone(), Interval(int, 0))


@pytest.mark.parametrize(
    "constraints,text",
    [
        ((Interval(int, 1),), "an integer in [1, inf]"),
        ((Interval(float, 0.0, 1.0, closed="right"),), "a finite number in (0.0, 1.0]"),
        ((Interval(float, 0, 1, closed="neither"),), "a finite number in (0.0, 1.0)"),
        (SEED, "None or an integer in [0, inf]"),
        ((Options(("random",)), Interval(int, 0)), "one of 'random' or an integer in [0, inf]"),
        ((Options((192, 128)),), "one of 192, 128"),
        ((Boolean(),), "True or False"),
        ((ListOf(Interval(int, 1), increasing=True),), "a non-empty, strictly increasing list of integers in [1, inf]"),
        ((ListOf(Options(("a", "b"))),), "a non-empty list, each item one of 'a', 'b'"),
    ],
)
def test_descriptions(constraints, text):
    assert describe(constraints) == text


def test_the_one_message_and_its_hint():
    with pytest.raises(tc.InvalidParameterError) as err:
        validate("demo", "k", 0, (Interval(int, 1),))
    assert str(err.value) == "demo: parameter 'k' must be an integer in [1, inf]; got 0."
    with pytest.raises(tc.InvalidParameterError) as err:
        validate("demo", "r", 100, (Options((64, 128), hint="Or pass counts=[...]."),))
    assert str(err.value) == "demo: parameter 'r' must be one of 64, 128; got 100. Or pass counts=[...]."


@pytest.mark.parametrize(
    "constraints,value,stored",
    [
        ((Interval(int, 1),), np.int64(3), 3),
        ((Interval(float, 0.0),), 2, 2.0),
        ((Interval(float, 0.0),), np.float32(0.5), 0.5),
        ((Options((64, 128)),), np.int64(64), 64),
        ((ListOf(Interval(int, 1)),), (3, np.int64(7)), [3, 7]),
        (SEED, None, None),
    ],
)
def test_accepted_values_are_stored_as_plain_python(constraints, value, stored):
    out = validate("demo", "p", value, constraints)
    assert out == stored and type(out) is type(stored)
    if isinstance(out, list):
        assert all(type(v) is int for v in out)


@pytest.mark.parametrize(
    "constraints,refused",
    [
        ((Interval(int, 1),), [0, True, 1.5, "1", math.nan, math.inf, None]),
        ((Interval(float, 0.0, 1.0, closed="right"),), [0.0, 1.5, True, "0.0", math.nan, math.inf]),
        (SEED, [-1, 0.5, True, "None"]),
        ((Options(("fps", "qr")),), ["FPS", "no-such-choice", 1, None]),
        ((Options((192, 128)),), [193, "192", 192.5, True]),
        ((Boolean(),), [0, 1, "True", None]),
        ((ListOf(Interval(int, 1), increasing=True),), [[], "[]", 1, [0], [1, 1], [True], [1.5]]),
    ],
)
def test_invalid_values_hold_the_near_misses_and_only_refused_values(constraints, refused):
    derived = invalid_values(constraints)
    for value in refused:
        assert any(type(v) is type(value) and (v == value or v != v and value != value) for v in derived), value
    assert not any(c.accepts(v) for v in derived for c in constraints)


def test_bools_are_no_integers_and_integers_no_bools():
    assert not Interval(int, 0).accepts(True)
    assert not Interval(float, 0.0).accepts(False)
    assert not Boolean().accepts(1)
    assert not Options((1, 2)).accepts(True)
    assert not Options(("a",)).accepts(1)


@given(st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=3)))
def test_validate_agrees_with_accepts(value):
    constraints = (IsNone(), Interval(int, 0, 3))
    if any(c.accepts(value) for c in constraints):
        assert validate("demo", "p", value, constraints) == value
    else:
        message = r"^demo: parameter 'p' must be None or an integer in \[0, 3\]"
        with pytest.raises(tc.InvalidParameterError, match=message):
            validate("demo", "p", value, constraints)


def test_every_bundled_parameter_is_declared():
    for name in tc.available():
        cls = tc.get(name)
        assert set(cls.parameter_constraints) == set(cls._param_names()), name


def test_malformed_intervals_are_bugs():
    with pytest.raises(TypeError, match="kind must be int or float"):
        Interval(str, 0)
    with pytest.raises(TypeError, match="closed must be"):
        Interval(int, 0, closed="open")
