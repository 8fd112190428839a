"""The conformance suite over every registered strategy, and over a user-defined subclass."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from tokencomp.constraints import Interval
from tokencomp.testing import SkipCheck, all_checks, check_compressor, parametrize_with_checks

STRATEGIES = tc.available()
CHECKS = list(all_checks())

_RANDOMISED = "randomised (deterministic=False): a row alone draws other random numbers than in a batch"
_NO_CONTEXT = "requires no context field"
# Every (strategy, check, reason) the registry skips: a check that newly stops applying fails here.
EXPECTED_SKIPS = {
    *((name, "check_batch_rows_independent", _RANDOMISED) for name in ("apet", "apet-llm", "random")),
    *(
        (name, "check_missing_context", _NO_CONTEXT)
        for name in ("apet", "apet-llm", "dart", "divprune", "pooling", "random", "tome")
    ),
}


@parametrize_with_checks([tc.create(name) for name in STRATEGIES])
def test_registered_strategy_conforms(compressor, check):
    check(compressor)


# strategies that can compute in the inputs' half precision, as their authors: the suite again in that mode
# (its cases include float16 and bfloat16 tokens)
HALF_PRECISION = [n for n in STRATEGIES if "compute_dtype" in tc.get(n).parameter_constraints]


@parametrize_with_checks([tc.create(name, compute_dtype="input") for name in HALF_PRECISION])
def test_input_precision_conforms(compressor, check):
    check(compressor)


def test_registry_skips_exactly_the_expected_checks():
    skips = set()
    for name in STRATEGIES:
        for check in CHECKS:
            try:
                check(tc.create(name))
            except SkipCheck as exc:
                skips.add((name, check.__name__, str(exc)))
    assert skips == EXPECTED_SKIPS


def _params(compressors):
    """The ``(id, compressor, check)`` of every case :func:`parametrize_with_checks` generates."""
    mark = parametrize_with_checks(compressors)
    return [(p.id, *p.values) for p in mark.args[1]]


def test_parametrize_with_checks_names_every_pair():
    ids = [case[0] for case in _params([tc.create("random"), tc.create("apet", basis="qr")])]
    names = [c.__name__ for c in CHECKS]
    assert ids == [f"random-{n}" for n in names] + [f"apet[basis=qr]-{n}" for n in names]


def test_parametrize_with_checks_turns_skipcheck_into_a_skip():
    cases = {case[0]: case[1:] for case in _params([tc.create("random")])}
    compressor, check = cases["random-check_batch_rows_independent"]
    with pytest.raises(pytest.skip.Exception, match="randomised"):
        check(compressor)  # a skip with its reason, never a pass
    compressor, check = cases["random-check_keep_all"]
    check(compressor)  # an applicable check runs as it is


def test_parametrize_with_checks_refuses_what_is_no_compressor():
    with pytest.raises(TypeError, match="Compressor instances"):
        parametrize_with_checks(["random"])


@pytest.mark.parametrize("name", ["random", "apet"])
def test_unseeded_randomised_strategy_conforms(name):
    skipped = check_compressor(tc.create(name, seed=None))
    assert skipped == [("check_batch_rows_independent", _RANDOMISED), ("check_missing_context", _NO_CONTEXT)]


def test_registry_holds_the_bundled_strategies():
    assert {"apet", "random", "pooling"} <= set(STRATEGIES)


@pytest.mark.parametrize(
    "params",
    [
        {"basis": "qr"},
        {"basis": "random", "num_basis": 4},
        {"error_norm": "relative", "basis_injection": "mix"},
        {"basis_injection": "none", "merge": False},
        {"fps_start": 3, "error_norm": "linf"},
    ],
)
def test_apet_variants_conform(params):
    check_compressor(tc.create("apet", **params))


class TopNorm(tc.Compressor):
    """Keep the k tokens of largest norm: the README's ten-line example."""

    deterministic = True

    parameter_constraints = {"power": (Interval(int, 1),)}

    def __init__(self, *, power: int = 2) -> None:
        self.power = power

    def _compress(self, tokens, k, context):
        score = tokens.abs().pow(self.power).sum(-1)
        idx = score.topk(k, dim=-1).indices.sort(dim=-1).values
        return tc.selection_result(tokens, idx)


def test_user_subclass_conforms():
    assert check_compressor(TopNorm(power=3)) == [("check_missing_context", _NO_CONTEXT)]
    assert TopNorm(power=3).get_params() == {"power": 3}


class Broken(tc.Compressor):
    deterministic = True

    def _compress(self, tokens, k, context):
        idx = torch.arange(k).flip(0).expand(tokens.shape[0], k)  # descending: breaks the contract
        return tc.selection_result(tokens, idx)


def test_conformance_catches_a_broken_strategy():
    with pytest.raises(AssertionError, match="ascending"):
        check_compressor(Broken())


class WrongShape(tc.Compressor):
    def _compress(self, tokens, k, context):
        return tc.selection_result(tokens, torch.arange(k + 1).expand(tokens.shape[0], k + 1))


def test_base_class_rejects_malformed_results():
    with pytest.raises(RuntimeError, match=r"WrongShape._compress returned a malformed result"):
        WrongShape().compress(torch.randn(2, 10, 3), 4)


class AcceptsAnything(tc.Compressor):
    """Stores its parameter undeclared: the conformance suite must say so."""

    deterministic = True

    def __init__(self, *, power: int = 2) -> None:
        self.power = power

    def _compress(self, tokens, k, context):
        return tc.selection_result(tokens, torch.arange(k).expand(tokens.shape[0], k))


class BypassesConstraints(AcceptsAnything):
    """Declares its parameter, but its ``__init__`` is replaced after the class exists, so never validated."""

    parameter_constraints = {"power": (Interval(int, 1),)}


def _unchecked_init(self, *, power: int = 2) -> None:
    self.power = power


BypassesConstraints.__init__ = _unchecked_init


def test_conformance_catches_undeclared_parameters():
    from tokencomp.testing import check_bad_parameters

    with pytest.raises(AssertionError, match=r"'power' have no entry in AcceptsAnything.parameter_constraints"):
        check_bad_parameters(AcceptsAnything())


def test_conformance_catches_unchecked_parameters():
    from tokencomp.testing import check_bad_parameters

    with pytest.raises(AssertionError, match="accepted power=<object"):
        check_bad_parameters(BypassesConstraints())


def test_declared_parameters_are_validated_and_converted_before_init():
    import numpy as np

    assert TopNorm(power=np.int64(3)).power == 3 and type(TopNorm(power=np.int64(3)).power) is int
    message = r"^TopNorm: parameter 'power' must be an integer in \[1, inf\]; got 0\.$"
    with pytest.raises(tc.InvalidParameterError, match=message):
        TopNorm(power=0)


def test_register_refuses_constraints_that_do_not_fit_init():
    class Misnamed(TopNorm):
        parameter_constraints = {"powr": (Interval(int, 1),)}

    with pytest.raises(ValueError, match=r"names 'powr', which is no keyword-only parameter of .*\(power\)"):
        tc.register("misnamed-demo")(Misnamed)

    class BadDefault(TopNorm):
        parameter_constraints = {"power": (Interval(int, 5),)}

    with pytest.raises(ValueError, match=r"the default power=2 is not allowed .* \(an integer in \[5, inf\]\)"):
        tc.register("bad-default-demo")(BadDefault)

    class NotAConstraint(TopNorm):
        parameter_constraints = {"power": (int,)}

    with pytest.raises(ValueError, match=r"must be a non-empty tuple of tokencomp.constraints.Constraint"):
        tc.register("not-a-constraint-demo")(NotAConstraint)
    assert not {"misnamed-demo", "bad-default-demo", "not-a-constraint-demo"} & set(tc.available())
