"""ApET: fidelity to the authors' procedure, LAPACK pivots, a hand-worked example, parameters."""

from __future__ import annotations

import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokencomp as tc
import tokencomp.strategies.apet as apet_module
from reference_apet import literal_apet, literal_fps
from tokencomp.kernels import qr_pivot_indices


def _tokens(b, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g) * torch.rand(b, n, 1, generator=g) * 3


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,d,k", [(576, 64, 64), (100, 32, 30), (50, 16, 11)])
def test_default_equals_literal_authors_procedure(seed, n, d, k):
    x = _tokens(2, n, d, seed)
    result = tc.create("apet", seed=seed).compress(x, k)
    for b in range(2):
        basis = result.info["basis_indices"][b].tolist()
        assert basis == literal_fps(x[b], 10, basis[0])
        positions, tokens = literal_apet(x[b], k, basis)
        assert result.indices[b].tolist() == positions
        torch.testing.assert_close(result.tokens[b], tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["position", "rank"])
@pytest.mark.parametrize("injection", ["replace", "mix", "none"])
@pytest.mark.parametrize("seed", range(3))
def test_injection_variants_equal_literal(injection, order, seed):
    x = _tokens(2, 144, 24, seed)
    comp = tc.create("apet", basis_injection=injection, injection_order=order, ridge=0.1, seed=seed)
    result = comp.compress(x, 40)
    for b in range(2):
        basis = result.info["basis_indices"][b].tolist()
        positions, tokens = literal_apet(x[b], 40, basis, ridge=0.1, injection=injection, order=order)
        assert result.indices[b].tolist() == positions
        torch.testing.assert_close(result.tokens[b], tokens, rtol=1e-5, atol=1e-5)


def test_hand_worked_example():
    # basis = token 0 = (1, 0). Errors: t1 = |(0, 1)| = 1 and t2 = |(1e-5/(1+1e-5), 1)| = 1 in float32
    # (a tie, broken towards the lower position), then t3 ~ 2e-5 > t0 ~ 1e-5. Top-3 = [1, 2, 3]; slot 3
    # (lowest kept error) takes the basis (1, 0); dropped t0 is closest in cosine to t2 = (1, 1), which
    # becomes ((1, 1) + (1, 0)) / 2 = (1, 0.5).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    result = tc.create("apet", num_basis=1, fps_start=0).compress(x, 3)
    assert result.indices.tolist() == [1, 2, 3]
    torch.testing.assert_close(result.tokens, torch.tensor([[0.0, 1.0], [1.0, 0.5], [1.0, 0.0]]))
    assert result.assignment.tolist() == [1, 0, 1, 2]
    assert result.info["basis_indices"].tolist() == [0]
    assert result.info["basis_slots"].tolist() == [2]
    errors = result.info["errors"]
    assert errors[1] == errors[2] == 1.0
    assert errors[3] > errors[0] > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d,m", [(576, 1024, 10), (200, 64, 10), (60, 40, 40)])
def test_qr_pivots_equal_lapack(dtype, n, d, m):
    x = _tokens(3, n, d, 7)
    ours = qr_pivot_indices(x.to(dtype), m)
    for b in range(3):
        _, _, piv = scipy.linalg.qr(x[b].double().numpy().T, pivoting=True, mode="economic")
        assert ours[b].tolist() == piv[:m].tolist()


def test_qr_basis_used_by_strategy():
    x = _tokens(2, 100, 50, 3)
    result = tc.create("apet", basis="qr", num_basis=8).compress(x, 20)
    for b in range(2):
        _, _, piv = scipy.linalg.qr(x[b].double().numpy().T, pivoting=True, mode="economic")
        assert result.info["basis_indices"][b].tolist() == piv[:8].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [90, 64])
def test_qr_basis_scales_from_the_checked_norms_with_the_same_result(dtype, n, monkeypatch):
    # compress() checks the tokens through their norms (ApET._inspect) and qr_pivots scales by the power
    # of two they give (and reads float32 tokens of N = padded_rows(N) in place); called directly,
    # _compress copies them scaled by token_scale: bit for bit the same result
    x = (_tokens(2, n, 24, 5) * 7).to(dtype)
    apet = tc.create("apet", basis="qr", num_basis=6)
    seen = []
    real = apet_module.qr_pivots
    monkeypatch.setattr(apet_module, "qr_pivots", lambda *a: seen.append(len(a)) or real(*a))
    via = apet.compress(x, 20)
    direct = apet._compress(x, 20, tc.Context())
    assert seen == [4, 2]  # with (scale, norms), then without
    assert torch.equal(via.tokens, direct.tokens.to(dtype))  # compress() restores the dtype
    for key in ("indices", "assignment"):
        assert torch.equal(getattr(via, key), getattr(direct, key))
    for key in ("errors", "basis_indices", "basis_slots"):
        assert torch.equal(via.info[key], direct.info[key])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("scale", [1.0, 1e30])
def test_qr_basis_rejects_non_finite_tokens(bad, scale):
    x = _tokens(2, 30, 8, 1) * scale
    x[1, 4, 2] = bad
    with pytest.raises(ValueError, match="apet: tokens contain NaN or infinite values"):
        tc.create("apet", basis="qr").compress(x, 12)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(12, 60), st.integers(2, 10))
def test_qr_basis_is_permutation_equivariant(seed, n, d):
    x = _tokens(1, n, d, seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    m = min(d, 5)
    a = qr_pivot_indices(x.double(), m)[0]
    b = qr_pivot_indices(x[:, perm].double(), m)[0]
    assert perm[b].tolist() == a.tolist()


def test_random_basis_draws_with_replacement_from_seed():
    x = _tokens(4, 20, 8, 0)
    comp = tc.create("apet", basis="random", num_basis=10, basis_injection="none", seed=3)
    basis = comp.compress(x, 5).info["basis_indices"]
    expected = torch.randint(20, (4, 10), generator=torch.Generator().manual_seed(3))
    assert torch.equal(basis, expected)


@pytest.mark.parametrize("norm", ["l2", "l1", "linf", "relative"])
def test_error_norms(norm):
    x = _tokens(1, 30, 6, 1)
    result = tc.create("apet", error_norm=norm, num_basis=3, fps_start=0).compress(x, 10)
    s = x[0, result.info["basis_indices"][0]]
    c = torch.linalg.solve(s @ s.T + 1e-5 * torch.eye(3), s @ x[0].T).T
    r = x[0] - c @ s
    expected = {
        "l2": r.norm(dim=-1),
        "l1": r.abs().sum(-1),
        "linf": r.abs().amax(-1),
        "relative": r.norm(dim=-1) / x[0].norm(dim=-1),
    }[norm]
    torch.testing.assert_close(result.info["errors"][0], expected, rtol=1e-4, atol=1e-5)
    kept_by_error = set(torch.topk(expected, 10).indices.tolist())
    assert set(result.indices[0].tolist()) == kept_by_error


def test_relative_error_of_zero_token_is_zero():
    x = _tokens(1, 20, 4, 2)
    x[0, 5] = 0
    errors = tc.create("apet", error_norm="relative", num_basis=2).compress(x, 8).info["errors"]
    assert errors[0, 5] == 0 and torch.isfinite(errors).all()


def test_merge_false_drops_unmerged():
    x = _tokens(2, 40, 8, 5)
    result = tc.create("apet", merge=False, num_basis=4).compress(x, 12)
    dropped = result.assignment == -1
    assert int(dropped.sum()) == 2 * (40 - 12)


def test_seed_controls_random_start():
    x = _tokens(3, 80, 8, 0)
    a = tc.create("apet", seed=1).compress(x, 20).info["basis_indices"][:, 0]
    b = tc.create("apet", seed=1).compress(x, 20).info["basis_indices"][:, 0]
    c = tc.create("apet", seed=2).compress(x, 20).info["basis_indices"][:, 0]
    assert torch.equal(a, b)
    assert torch.equal(a, torch.randint(80, (3,), generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(a, c)
    g = torch.Generator().manual_seed(9)
    d = tc.create("apet").compress(x, 20, tc.Context(generator=g)).info["basis_indices"][:, 0]
    assert torch.equal(d, torch.randint(80, (3,), generator=torch.Generator().manual_seed(9)))


@pytest.mark.parametrize(
    "params,fragment",
    [
        ({"basis": "kmeans"}, "'basis' must be one of 'fps', 'random', 'qr'"),
        ({"num_basis": 0}, "'num_basis' must be an integer in [1, inf]"),
        ({"num_basis": 2.5}, "'num_basis'"),
        ({"fps_start": "middle"}, "'fps_start'"),
        ({"fps_start": -1}, "'fps_start'"),
        ({"error_norm": "l3"}, "'error_norm'"),
        ({"ridge": 0.0}, "'ridge'"),
        ({"ridge": float("nan")}, "'ridge'"),
        ({"basis_injection": "add"}, "'basis_injection'"),
        ({"injection_order": "random"}, "'injection_order' must be one of 'position', 'rank'"),
        ({"merge": 1}, "'merge' must be True or False"),
        ({"seed": -3}, "'seed'"),
    ],
)
def test_bad_parameters_raise_on_construction(params, fragment):
    with pytest.raises(tc.InvalidParameterError) as err:
        tc.create("apet", **params)
    assert fragment in str(err.value)
    assert repr(list(params.values())[0]) in str(err.value)


def test_budget_must_hold_the_basis():
    x = _tokens(1, 50, 8, 0)
    with pytest.raises(ValueError, match=r"apet: budget K=10 cannot hold num_basis=10 .*K must be >= 11"):
        tc.create("apet").compress(x, 10)
    assert tc.create("apet", basis_injection="none").compress(x, 10).kept == 10
    assert tc.create("apet", merge=False).compress(x, 10).kept == 10
    with pytest.raises(ValueError, match="fps_start=60"):
        tc.create("apet", fps_start=60).compress(x, 20)


def test_repeated_basis_tokens_with_large_norms_solve():
    # random basis draws with replacement; with norms ~100 the 1e-5 ridge vanishes in float32
    x = _tokens(4, 576, 64, 0) * 50
    comp = tc.create("apet", basis="random", num_basis=10, seed=0)
    basis = torch.randint(576, (4, 10), generator=torch.Generator().manual_seed(0))
    basis[:, 1] = basis[:, 0]  # force a repeat in every row
    s = torch.gather(x, 1, basis[..., None].expand(-1, -1, 64))
    from tokencomp.kernels import ridge_residual

    res = ridge_residual(x, s, 1e-5)
    assert torch.isfinite(res).all()
    # the repeated token is rebuilt exactly, like every basis token
    assert res.norm(dim=-1).gather(1, basis).max() < 1e-2 * x.norm(dim=-1).mean()
    assert torch.isfinite(comp.compress(x, 64).tokens).all()


def test_identical_tokens_give_finite_output():
    x = torch.ones(2, 30, 5)
    result = tc.create("apet").compress(x, 12)
    assert torch.isfinite(result.tokens).all()
    torch.testing.assert_close(result.tokens, torch.ones(2, 12, 5))


def test_half_precision_input_and_output():
    x = _tokens(2, 64, 16, 0)
    full = tc.create("apet").compress(x, 16)
    half = tc.create("apet").compress(x.half(), 16)
    assert half.tokens.dtype == torch.float16
    same = (half.indices == full.indices).float().mean()
    assert same > 0.9


@pytest.mark.parametrize("seed", range(3))
def test_stage_two_injects_in_rank_order_like_the_authors(seed):
    x = _tokens(2, 200, 32, seed)
    comp = tc.create("apet-llm", seed=seed)
    assert comp.stage == "in_llm" and comp.layer == 16 and comp.injection_order == "rank"
    result = comp.compress(x, 48)
    for b in range(2):
        basis = result.info["basis_indices"][b].tolist()
        positions, tokens = literal_apet(x[b], 48, basis, order="rank")
        assert result.indices[b].tolist() == positions
        torch.testing.assert_close(result.tokens[b], tokens, rtol=1e-5, atol=1e-5)


def test_stage_two_parameter_errors_name_it():
    with pytest.raises(tc.InvalidParameterError, match="apet-llm: parameter 'layer'"):
        tc.create("apet-llm", layer=-1)
    with pytest.raises(tc.InvalidParameterError, match="apet-llm: parameter 'basis'"):
        tc.create("apet-llm", basis="kmeans")
