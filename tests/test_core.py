"""The public API contract: budgets, input checks, context checks, registry, parameters."""

from __future__ import annotations

import json
import sys
import textwrap
from importlib.metadata import EntryPoint

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tokencomp as tc
from tokencomp import registry
from tokencomp.validation import resolve_budget


def test_public_names():
    for name in ("available", "create", "register", "Compressor", "Context", "CompressionResult"):
        assert hasattr(tc, name)
    assert tc.available() == sorted(tc.available())


@pytest.mark.parametrize(
    "budget,n,k",
    [
        (1, 10, 1),
        (10, 10, 10),
        (np.int64(4), 10, 4),
        (0.5, 10, 5),
        (1.0, 7, 7),
        (0.01, 10, 1),
        (0.25, 576, 144),
        (0.15, 10, 2),
        (0.25, 10, 2),
        (0.35, 10, 4),
    ],
)
def test_resolve_budget(budget, n, k):
    # round() halves to even: 0.25 * 10 = 2.5 -> 2, 0.35 * 10 = 3.5 -> 4
    assert resolve_budget("x", budget, n) == k


@pytest.mark.parametrize("budget", [0, -1, 11, 0.0, 1.01, -0.2, float("inf"), float("nan"), "3", None, True, False])
def test_resolve_budget_rejects(budget):
    with pytest.raises(ValueError, match="x: budget"):
        resolve_budget("x", budget, 10)


@given(st.integers(1, 5000), st.floats(min_value=1e-6, max_value=1.0))
def test_float_budget_is_a_count_in_range(n, f):
    k = resolve_budget("x", f, n)
    assert 1 <= k <= n and k == max(1, round(f * n))


def test_budget_error_names_strategy_and_range():
    with pytest.raises(ValueError) as err:
        tc.create("random").compress(torch.randn(20, 4), 21)
    assert "random: budget 21 is out of range" in str(err.value) and "[1, 20]" in str(err.value)


@pytest.mark.parametrize(
    "tokens,fragment",
    [
        (torch.ones(4, 3, dtype=torch.int64), "floating-point dtype"),
        (torch.ones(5), "[B, N, D] or [N, D]"),
        (torch.ones(1, 2, 5, 3), "4 dimensions"),
        (torch.ones(2, 0, 3), "B, N, D >= 1"),
        (torch.tensor([[1.0, float("inf")]]), "NaN or infinite"),
        ([[1.0, 2.0]], "must be a torch.Tensor"),
    ],
)
def test_bad_tokens(tokens, fragment):
    with pytest.raises(ValueError) as err:
        tc.create("random").compress(tokens, 1)
    assert fragment in str(err.value)


class _Inspecting(tc.Compressor):
    """Keeps the first k tokens; its check is the row sums, which _compress reads back."""

    seen: list = []

    def _inspect(self, tokens):
        sums = tokens.sum(dim=-1)
        return torch.isfinite(sums) & (sums.abs() < 1e6), sums

    def _compress(self, tokens, k, context):
        self.seen.append(self._inspected(tokens))
        b, n, _ = tokens.shape
        indices = torch.arange(k).expand(b, k)
        assignment = torch.where(torch.arange(n) < k, torch.arange(n), -1).expand(b, n)
        return tc.CompressionResult(tokens=tokens[:, :k], indices=indices, assignment=assignment, info={})


def test_strategy_check_replaces_the_sum_and_hands_its_results_on():
    comp = _Inspecting()
    comp.seen = []
    x = torch.randn(2, 6, 3)
    comp.compress(x, 2)
    assert torch.equal(comp.seen[-1], x.sum(dim=-1))  # the same tensor: what _inspect computed
    comp._compress(x, 2, tc.Context())
    assert comp.seen[-1] is None  # outside compress()
    comp.compress(x * 1e7, 2)  # its check cannot vouch: the exact check passes, nothing is handed on
    assert comp.seen[-1] is None
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 5] = False
    comp.compress(x, 2, tc.Context(valid=valid))  # a padded sub-batch is another tensor
    assert comp.seen[-1] is None
    x[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="_Inspecting: tokens contain NaN or infinite values"):
        comp.compress(x, 2)


def test_context_shape_checks():
    x = torch.randn(2, 16, 4)
    comp = tc.create("random")
    with pytest.raises(ValueError, match=r"context.grid=\(3, 5\) holds 15 tokens but the tokens have N=16"):
        comp.compress(x, 4, tc.Context(grid=(3, 5)))
    with pytest.raises(ValueError, match=r"context.cls_attention must have shape \[B, N\] = \[2, 16\]"):
        comp.compress(x, 4, tc.Context(cls_attention=torch.rand(2, 15)))
    with pytest.raises(ValueError, match="context.valid must be a bool tensor"):
        comp.compress(x, 4, tc.Context(valid=torch.ones(2, 16)))
    with pytest.raises(ValueError, match="context must be a tokencomp.Context"):
        comp.compress(x, 4, {"grid": (4, 4)})


@pytest.mark.parametrize(
    "context,fragment",
    [
        (
            tc.Context(grid=(True, 16)),
            r"context.grid must be \(h, w\) or \(t, h, w\) of positive ints; got \(True, 16\)",
        ),
        (
            tc.Context(cls_attention=torch.ones(2, 16, dtype=torch.int64)),
            r"cls_attention must be a floating-point tensor \[B, N\]; got torch.int64",
        ),
        (
            tc.Context(visual_positions=torch.zeros(2, 16)),
            r"visual_positions must be a int64 tensor \[B, N\]; got torch.float32",
        ),
        (tc.Context(key_mask=torch.ones(2, 20)), r"key_mask must be a bool tensor \[B, L\]; got torch.float32"),
        (tc.Context(layer="abc"), r"context.layer must be an int >= 0 or None; got 'abc'"),
        (tc.Context(layer=True), r"context.layer must be an int >= 0 or None; got True"),
        (tc.Context(schedule_n=0), r"context.schedule_n must be an int >= 1 or None; got 0"),
        (tc.Context(generator=0), r"context.generator must be a torch.Generator or None; got int"),
    ],
)
def test_context_values_of_the_wrong_kind_are_refused(context, fragment):
    """Each of these was accepted silently (or failed deep inside a strategy)."""
    with pytest.raises(ValueError, match=fragment):
        tc.create("random").compress(torch.randn(2, 16, 4), 4, context)


@pytest.mark.parametrize("name", ["apet", "tome", "divprune", "pooling", "random"])
def test_compression_under_autograd_is_a_clear_error(name):
    """apet, tome and divprune raised "functions with out=... arguments don't support automatic differentiation"."""
    x = torch.randn(2, 64, 8, requires_grad=True)
    with pytest.raises(ValueError, match=rf"^{name}: tokens require grad and autograd is on.*torch.no_grad\(\)"):
        tc.create(name).compress(x, 16)
    with torch.no_grad():
        assert tc.create(name).compress(x, 16).tokens.shape == (2, 16, 8)
    assert tc.create(name).compress(x.detach(), 16).tokens.shape == (2, 16, 8)


def test_required_context_field_is_named():
    class NeedsCls(tc.Compressor):
        requires = ("cls_attention",)

        def _compress(self, tokens, k, context):
            idx = context.cls_attention.topk(k, dim=-1).indices.sort(dim=-1).values
            return tc.selection_result(tokens, idx)

    x = torch.randn(2, 16, 4)
    with pytest.raises(ValueError, match="needs context.cls_attention, which is missing"):
        NeedsCls().compress(x, 4)
    attn = torch.arange(16.0).expand(2, 16)
    assert NeedsCls().compress(x, 4, tc.Context(cls_attention=attn)).indices.tolist() == [[12, 13, 14, 15]] * 2
    # unbatched tokens take unbatched context rows
    assert NeedsCls().compress(x[0], 2, tc.Context(cls_attention=attn[0])).indices.tolist() == [14, 15]


def test_unknown_strategy_suggests_close_names():
    with pytest.raises(KeyError, match=r"unknown strategy 'apte'. Did you mean 'apet'"):
        tc.create("apte")


def test_unknown_parameter_lists_allowed():
    with pytest.raises(
        tc.InvalidParameterError, match=r"apet: unknown parameter\(s\) 'bases'; allowed: basis, num_basis"
    ):
        tc.create("apet", bases="qr")


def test_duplicate_name_refused():
    with pytest.raises(ValueError, match="'apet' is already taken by tokencomp.strategies.apet.ApET"):

        @tc.register("apet")
        class Other(tc.Compressor):
            def _compress(self, tokens, k, context):
                raise NotImplementedError


@pytest.mark.parametrize("bad", ["", "Apet", "1x", "a b", None])
def test_bad_register_name(bad):
    with pytest.raises(ValueError, match="strategy name must be"):
        tc.register(bad)


def test_register_needs_a_compressor():
    with pytest.raises(ValueError, match="expected a tokencomp.Compressor subclass"):
        tc.register("not-a-compressor")(dict)


def test_params_roundtrip_through_json():
    comp = tc.create("apet", basis="qr", num_basis=6, error_norm="l1", ridge=0.1, basis_injection="mix", seed=None)
    params = json.loads(json.dumps(comp.get_params()))
    assert tc.create("apet", **params).get_params() == comp.get_params()
    assert repr(comp).startswith("ApET(basis='qr', num_basis=6")


def test_entry_point_plugins_are_loaded(tmp_path, monkeypatch):
    module = tmp_path / "my_tc_plugin.py"
    module.write_text(
        textwrap.dedent(
            """
            import tokencomp as tc

            class KeepLast(tc.Compressor):
                deterministic = True
                summary = "keep the last k tokens"

                def _compress(self, tokens, k, context):
                    import torch
                    n = tokens.shape[1]
                    return tc.selection_result(tokens, torch.arange(n - k, n).expand(tokens.shape[0], k))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint(name="keep-last", value="my_tc_plugin:KeepLast", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    assert "keep-last" in tc.available()
    assert tc.create("keep-last").compress(torch.randn(1, 6, 2), 2).indices.tolist() == [[4, 5]]
    sys.modules.pop("my_tc_plugin", None)


def test_broken_plugin_is_named(monkeypatch):
    ep = EntryPoint(name="broken", value="no_such_module_xyz:Thing", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep])
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    with pytest.raises(ImportError, match="the strategy plugin 'broken' .* failed to import"):
        tc.available()


def test_plugin_that_is_not_a_compressor_is_an_error(monkeypatch):
    ep = EntryPoint(name="not-a-strategy", value="os.path:join", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep])
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    with pytest.raises(ImportError, match=r"'not-a-strategy' \(os.path:join\) .* not a tokencomp.Compressor subclass"):
        tc.available()


@pytest.mark.parametrize(
    "attribute, value, allowed",
    [
        ("stage", "in-llm", "'pre_llm', 'in_llm'"),
        ("in_llm_positions", "renumbered", "'keep', 'renumber'"),
        ("padding", "row", "'rows', 'native', 'unsupported'"),
        ("needs_attention", "yes", "False, True"),
        ("deterministic", 1, "False, True"),
    ],
)
def test_misspelled_capability_fails_at_registration(attribute, value, allowed):
    cls = type("Misspelled", (tc.Compressor,), {attribute: value, "_compress": lambda self, t, k, c: None})
    name = f"misspelled-{attribute.replace('_', '-')}"
    with pytest.raises(ValueError, match=rf"register\('{name}'\): {attribute} must be one of {allowed}; got {value!r}"):
        tc.register(name)(cls)
    assert name not in registry._registry


def test_an_in_llm_strategy_must_declare_its_layers():
    cls = type("Nowhere", (tc.Compressor,), {"stage": "in_llm", "layer": 2, "_compress": lambda s, t, k, c: None})
    with pytest.raises(
        ValueError,
        match=r"register\('nowhere'\): an in-LLM strategy must say where it acts; override "
        r"Nowhere.llm_layers\(\)",
    ):
        tc.register("nowhere")(cls)
    assert "nowhere" not in registry._registry


def test_every_in_llm_strategy_declares_layers_and_one_schedule_signature():
    for name in tc.available():
        comp = tc.create(name)
        layers = comp.llm_layers()
        assert (comp.stage == "in_llm") == bool(layers), name
        assert all(isinstance(v, int) for v in layers) and list(layers) == sorted(set(layers)), name
        schedule = comp.stage_budgets(576)
        assert (schedule is not None) == comp.sets_own_budgets(), name
        if schedule is not None:
            assert len(schedule) == len(layers) and all(1 <= k <= 576 for k in schedule), name


def test_requires_must_name_context_fields():
    cls = type("NeedsNothingReal", (tc.Compressor,), {"requires": ("cls_attn",), "_compress": lambda s, t, k, c: None})
    with pytest.raises(ValueError, match=r"requires names 'cls_attn', which are not tokencomp.Context fields"):
        tc.register("needs-nothing-real")(cls)


def test_capabilities_are_class_attributes():
    for name in tc.available():
        cls = tc.get(name)
        assert cls.stage in ("pre_llm", "in_llm")
        for flag in ("needs_attention", "text_conditioned", "deterministic"):
            assert isinstance(getattr(cls, flag), bool)
        assert cls.summary


@pytest.mark.parametrize(
    "parent, params",
    [("pdrop", {"ratio": 2.0}), ("sparsevlm", {"recycle": "yes"}), ("fastv", {"layer": 0}), ("tome", {"chunk": 0})],
)
def test_a_subclass_registered_under_another_name_reports_its_own_name(parent, params, monkeypatch):
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    child = tc.register(f"my-{parent}")(type(f"My{parent}", (tc.get(parent),), {}))
    with pytest.raises(tc.InvalidParameterError, match=rf"^my-{parent}: "):
        child(**params)
