"""Checks of the call contract: shapes and indices, budgets, dtypes, reproducibility, parameters."""

from __future__ import annotations

import json

import torch

from ..base import Compressor
from ..registry import create, get
from ._asserts import assert_result_valid
from ._calls import accepts, fresh, pinned, run, some_budgets
from ._data import B, D, N, make_context, make_tokens
from ._skip import SkipCheck


def check_shapes_and_indices(compressor: Compressor) -> None:
    """Output shapes, indices unique/in range (ascending in position order), assignment consistent."""
    x = make_tokens()
    for k in some_budgets(compressor):
        result = run(compressor, x, k)
        assert_result_valid(compressor, result, x, k)


def check_float_budget(compressor: Compressor) -> None:
    """A float budget keeps ``max(1, round(f * N))`` tokens, the same as that int budget."""
    x = make_tokens()
    ctx = make_context(compressor, x)
    for k in some_budgets(compressor):
        f = k / N
        assert max(1, round(f * N)) == k
        a = fresh(compressor).compress(x, f, pinned(compressor, ctx))
        b = fresh(compressor).compress(x, k, pinned(compressor, ctx))
        assert a.kept == k, f"{compressor!r}: budget {f} kept {a.kept}, expected {k}"
        assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens), (
            f"{compressor!r}: float budget {f} and int budget {k} disagree"
        )


def check_dtype_and_device(compressor: Compressor) -> None:
    """The output has the input's dtype and device, for float16, bfloat16, float32 and float64."""
    k = some_budgets(compressor)[-1]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = make_tokens(dtype=dtype)
        assert_result_valid(compressor, run(compressor, x, k), x, k)


def check_seeded_determinism(compressor: Compressor) -> None:
    """Two calls, and two instances with the same parameters, give the same result.

    An unseeded randomised strategy is given the same fresh ``Context.generator`` on each call, so this
    checks that it draws all its random numbers from it.
    """
    x = make_tokens()
    k = some_budgets(compressor)[0]
    first = run(compressor, x, k)
    again = run(compressor, x, k)
    other = run(fresh(compressor), x, k)
    for r in (again, other):
        assert torch.equal(first.indices, r.indices), f"{compressor!r}: not reproducible (indices)"
        assert torch.equal(first.assignment, r.assignment), f"{compressor!r}: not reproducible (assignment)"
        assert torch.equal(first.tokens, r.tokens), f"{compressor!r}: not reproducible (tokens)"


def check_get_params_roundtrip(compressor: Compressor) -> None:
    """``get_params`` is JSON-serialisable and rebuilds an equal compressor (also through the registry)."""
    params = compressor.get_params()
    restored = json.loads(json.dumps(params))
    assert restored == params, f"{compressor!r}: get_params() is not JSON round-trippable: {params}"
    rebuilt = type(compressor)(**restored)
    assert rebuilt.get_params() == params
    if compressor.name:
        assert get(compressor.name) is type(compressor), f"{compressor!r}: registered under another class"
        assert create(compressor.name, **restored).get_params() == params
    x = make_tokens()
    k = some_budgets(compressor)[0]
    a, b = run(compressor, x, k), run(rebuilt, x, k)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens)


def check_keep_all(compressor: Compressor) -> None:
    """Keeping every token keeps every position, each mapped to its own slot (in position order unless the
    strategy's ``output_order`` is ``"strategy"``)."""
    x = make_tokens()
    ctx = make_context(compressor, x)
    if not accepts(compressor, N, N, ctx):
        raise SkipCheck(f"rejects the budget K=N={N} as configured")
    result = compressor.compress(x, N, ctx)
    every = torch.arange(N).expand(B, N)
    if compressor.output_order == "position":
        assert torch.equal(result.indices, every), f"{compressor!r}: K=N kept {result.indices}"
        assert torch.equal(result.assignment, every), f"{compressor!r}: K=N assigned {result.assignment}"
    else:
        assert torch.equal(result.indices.sort(dim=1).values, every), f"{compressor!r}: K=N kept {result.indices}"
        assert torch.equal(result.assignment.gather(1, result.indices), every), (
            f"{compressor!r}: K=N: a kept position does not map to its own slot: {result.assignment}"
        )


def check_no_host_sync(compressor: Compressor) -> None:
    """``_compress`` runs on the ``meta`` device, so its kernel never waits for the host.

    Meta tensors have shapes but no data: ``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()``,
    ``nonzero`` and every other operation whose result depends on the values fail there. A kernel that
    passes runs on a GPU without a device-to-host synchronisation. Inputs are validated first, on the
    CPU, by :meth:`~tokencomp.Compressor.compress` (validation may synchronise: it has to raise); a
    ``seed`` parameter is set to ``None`` because seeded generators live on a real device.
    """
    params = compressor.get_params()
    if "seed" in params:
        params["seed"] = None
    unseeded = type(compressor)(**params)
    x = make_tokens()
    context = make_context(unseeded, x)  # batched, as compress() hands it to _compress
    k = some_budgets(unseeded)[0]
    unseeded.compress(x, k, context)
    try:
        result = unseeded._compress(x.to("meta"), k, context.to("meta"))
    except (RuntimeError, NotImplementedError) as exc:
        raise AssertionError(
            f"{compressor!r}: _compress needs the tensors' values on the host (or an operation without a "
            f"meta kernel), so it would stall a GPU: {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    assert result.tokens.device.type == "meta" and tuple(result.tokens.shape) == (B, k, D), (
        f"{compressor!r}: on the meta device _compress returned tokens {tuple(result.tokens.shape)} "
        f"on {result.tokens.device}"
    )
