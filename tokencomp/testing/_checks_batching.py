"""Checks of the batch axis: unbatched input, rows independent of each other, padded batches."""

from __future__ import annotations

import torch

from ..base import Compressor
from ..types import Context
from ._asserts import assert_result_valid
from ._calls import accepts, fresh, pinned, run, some_budgets
from ._data import B, D, N, make_context, make_tokens, padded_valid
from ._skip import SkipCheck


def check_unbatched(compressor: Compressor) -> None:
    """``[N, D]`` input gives the batch-free version of the ``[1, N, D]`` result."""
    x = make_tokens(b=1)
    k = some_budgets(compressor)[0]
    batched = run(fresh(compressor), x, k)
    single = fresh(compressor).compress(x[0], k, pinned(compressor, make_context(compressor, x)))
    assert tuple(single.tokens.shape) == (k, D), f"{compressor!r}: unbatched tokens {tuple(single.tokens.shape)}"
    assert torch.equal(single.indices, batched.indices[0])
    assert torch.equal(single.assignment, batched.assignment[0])
    torch.testing.assert_close(single.tokens, batched.tokens[0])
    for key, value in batched.info.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1:
            assert torch.equal(single.info[key], value[0]), f"{compressor!r}: info[{key!r}] not unbatched"


def check_batch_rows_independent(compressor: Compressor) -> None:
    """For deterministic strategies, row ``b`` of a batch equals compressing row ``b`` alone.

    Skipped for a randomised strategy: a batch draws its rows' random numbers from one stream, so row
    ``b`` alone draws other ones, seeded or not, and there is nothing to compare.
    """
    if not compressor.deterministic:
        raise SkipCheck("randomised (deterministic=False): a row alone draws other random numbers than in a batch")
    x = make_tokens()
    k = some_budgets(compressor)[0]
    ctx = make_context(compressor, x)
    whole = compressor.compress(x, k, ctx)
    for i in range(B):
        part = compressor.compress(x[i : i + 1], k, ctx.row(i))
        assert torch.equal(part.indices[0], whole.indices[i]), f"{compressor!r}: row {i} depends on the batch"
        torch.testing.assert_close(part.tokens[0], whole.tokens[i])


def _padded_example(compressor: Compressor) -> tuple[torch.Tensor, torch.Tensor, Context, int]:
    """Tokens ``[3, N, D]`` with padding (:func:`padded_valid`), their ``valid``, a context and a budget."""
    x = make_tokens()
    valid = padded_valid()
    context = make_context(compressor, x).replace(grid=None, valid=valid)
    n_min = int(valid.sum(1).min())
    budgets = [k for k in some_budgets(compressor) if k <= n_min]
    return x, valid, context, (budgets[len(budgets) // 2] if budgets else 1)


def _alone(context: Context, i: int, keep: torch.Tensor) -> Context:
    """Row ``i``'s context restricted to the token positions ``keep`` ``[N]`` bool (the reference)."""
    positions = keep.nonzero().flatten().unsqueeze(0)
    return context.take_tokens(positions, rows=torch.tensor([i])).replace(valid=None, grid=None)


def check_padded_batch(compressor: Compressor) -> None:
    """Padding marked by ``Context.valid`` is never kept, merged into or looked at.

    With :attr:`~tokencomp.Compressor.padding` ``"rows"`` or ``"native"``: the kept positions are
    valid ones; padding positions have ``assignment`` ``-1``; changing the padding's values changes
    nothing; a deterministic strategy gives each row what its valid tokens give alone (with the
    per-token context fields at those positions). A budget above a row's valid count raises
    ``ValueError`` naming the row. With ``"unsupported"``, a padded batch raises ``ValueError``.
    """
    who = repr(compressor)
    x, valid, context, k = _padded_example(compressor)
    if compressor.padding == "unsupported":
        try:
            fresh(compressor).compress(x, k, context)
        except ValueError as exc:
            assert "padded" in str(exc), f"{who}: the padding error does not say so: {exc}"
            return
        raise AssertionError(f"{who}: declares padding='unsupported' but accepted a padded batch")
    result = fresh(compressor).compress(x, k, pinned(compressor, context))
    assert_result_valid(compressor, result, x, k)
    assert bool(torch.gather(valid, 1, result.indices).all()), f"{who}: kept a padding position"
    assert bool((result.assignment[~valid] == -1).all()), f"{who}: a padding token was assigned to an output slot"
    garbage = x.clone()
    garbage[~valid] = torch.randn(int((~valid).sum()), D) * 100
    other = fresh(compressor).compress(garbage, k, pinned(compressor, context))
    assert torch.equal(result.indices, other.indices) and torch.equal(result.tokens, other.tokens), (
        f"{who}: the values of padding tokens changed the result"
    )
    if compressor.deterministic:
        for i in range(B):
            alone = fresh(compressor).compress(x[i : i + 1, valid[i]], k, _alone(context, i, valid[i]))
            positions = valid[i].nonzero().flatten()
            assert torch.equal(positions[alone.indices[0]], result.indices[i]), (
                f"{who}: padded row {i} kept other tokens than its valid tokens alone"
            )
            torch.testing.assert_close(alone.tokens[0], result.tokens[i])
    n_short = int(valid.sum(1).min())
    if accepts(compressor, n_short + 1, N, context):
        try:
            fresh(compressor).compress(x, n_short + 1, context)
        except ValueError as exc:
            assert "row 2" in str(exc) and "valid" in str(exc), f"{who}: the short-row error is unclear: {exc}"
        else:
            raise AssertionError(f"{who}: kept {n_short + 1} tokens of a row with {n_short} valid ones")
