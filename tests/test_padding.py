"""Padded batches (``Context.valid``): the rows path, info mapping, declarations and errors."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from tokencomp.testing import check_padded_batch


def _padded(lengths, n=12, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), n, d, generator=g)
    valid = torch.arange(n).expand(len(lengths), n) < torch.tensor(lengths).unsqueeze(1)
    return x, valid


class KeepFirst(tc.Compressor):
    """Keeps the first K positions it is given: shows exactly which tokens it saw."""

    deterministic = True
    info_layout = {"seen": "token", "last": "position", "count": "row"}

    def _compress(self, tokens, k, context):
        b, n, _ = tokens.shape
        idx = torch.arange(k).expand(b, k)
        return tc.selection_result(
            tokens,
            idx,
            seen=torch.arange(n, dtype=torch.float32).expand(b, n),
            last=torch.full((b, 1), n - 1),
            count=torch.full((b,), n),
            secret=torch.zeros(b),
        )


def test_rows_path_gives_each_row_its_valid_tokens_and_maps_info_back():
    x, valid = _padded([12, 7, 9])
    valid[2, 0] = False  # padding at the front too: row 2's valid positions are 1..8
    out = KeepFirst().compress(x, 3, tc.Context(valid=valid))
    assert out.indices.tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 3]]
    assert out.assignment[1].tolist() == [0, 1, 2] + [-1] * 9
    assert out.assignment[2].tolist() == [-1, 0, 1, 2] + [-1] * 8
    torch.testing.assert_close(out.tokens[2], x[2, 1:4])
    # "token" info: the value each valid token got, NaN at padding; "position": mapped to the padded
    # positions; "row": unchanged; undeclared entries are left out
    seen = out.info["seen"]
    assert seen[1, :7].tolist() == list(range(7)) and bool(seen[1, 7:].isnan().all())
    assert seen[2, 1:9].tolist() == list(range(8)) and bool(seen[2, 0].isnan())
    assert out.info["last"].tolist() == [[11], [6], [8]]
    assert out.info["count"].tolist() == [12, 7, 8]
    assert "secret" not in out.info


def test_all_true_valid_is_the_plain_call():
    x, _ = _padded([12, 12])
    a = KeepFirst().compress(x, 4, tc.Context(valid=torch.ones(2, 12, dtype=torch.bool)))
    assert "secret" in a.info  # no padding: the strategy's own result, untouched


def test_budget_above_a_rows_valid_count_names_the_row():
    x, valid = _padded([12, 5, 9])
    with pytest.raises(ValueError, match=r"batch row 1 has 5 valid tokens .* K=6.*at most 5"):
        tc.create("apet", num_basis=2).compress(x, 6, tc.Context(valid=valid))
    # a fraction resolves against the padded length N = 12: 0.5 -> 6 > 5
    with pytest.raises(ValueError, match="batch row 1 has 5 valid tokens"):
        tc.create("apet", num_basis=2).compress(x, 0.5, tc.Context(valid=valid))


def test_a_row_of_padding_only_is_rejected():
    x, valid = _padded([12, 0])
    with pytest.raises(ValueError, match="batch row 1 has 0 valid tokens"):
        tc.create("random", seed=0).compress(x, 1, tc.Context(valid=valid))


def test_apet_on_a_padded_batch_maps_errors_and_basis():
    x, valid = _padded([12, 8], d=6)
    out = tc.create("apet", num_basis=3).compress(x, 4, tc.Context(valid=valid))
    alone = tc.create("apet", num_basis=3).compress(x[1:, :8], 4)
    assert torch.equal(out.indices[1], alone.indices[0])
    assert torch.equal(out.info["basis_indices"][1], alone.info["basis_indices"][0])
    torch.testing.assert_close(out.info["errors"][1, :8], alone.info["errors"][0])
    assert bool(out.info["errors"][1, 8:].isnan().all())
    torch.testing.assert_close(out.tokens[1], alone.tokens[0])  # merging happens among valid tokens only


def test_pooling_rejects_padding_clearly():
    x, valid = _padded([16, 12], n=16)
    with pytest.raises(ValueError, match="padded batches .* are not supported"):
        tc.create("pooling").compress(x, 4, tc.Context(grid=(4, 4), valid=valid))


class IgnoresPadding(tc.Compressor):
    """Claims to handle padding itself but keeps the K largest-norm tokens, padding included."""

    deterministic = True
    padding = "native"

    def _compress(self, tokens, k, context):
        idx = tokens.norm(dim=-1).topk(k, dim=-1).indices.sort(dim=-1).values
        return tc.selection_result(tokens, idx)


def test_the_padding_check_catches_a_strategy_that_keeps_padding():
    with pytest.raises(AssertionError, match="padding"):
        check_padded_batch(IgnoresPadding())


def test_registration_checks_the_padding_declarations():
    with pytest.raises(ValueError, match="padding must be one of 'rows', 'native', 'unsupported'; got 'skip'"):

        @tc.register("bad-padding-decl")
        class Bad(tc.Compressor):
            padding = "skip"

            def _compress(self, tokens, k, context):  # pragma: no cover
                raise NotImplementedError

    with pytest.raises(ValueError, match="info_layout kinds must be one of position, token, row"):

        @tc.register("bad-layout-decl")
        class Bad2(tc.Compressor):
            info_layout = {"x": "slot"}

            def _compress(self, tokens, k, context):  # pragma: no cover
                raise NotImplementedError

    assert "bad-padding-decl" not in tc.available() and "bad-layout-decl" not in tc.available()
