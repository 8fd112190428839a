"""The fast kernels: equal to straightforward references, block by block, in half precision, in bounded memory."""

from __future__ import annotations

import contextlib

import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tokencomp as tc
import tokencomp.kernels.blocks as blocks
from reference_apet import literal_fps
from tokencomp.analysis.measure import peak_memory
from tokencomp.kernels import (
    batched_gather,
    cosine_match,
    fps_indices,
    mean_merge,
    merge_rows,
    pivoted_ridge_errors,
    qr_pivots,
    residual_errors,
    ridge_errors,
    ridge_residual,
    row_blocks,
    rows_matmul,
)
from tokencomp.validation import check_tokens


def _tokens(b, n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, d, generator=g) * torch.rand(b, n, 1, generator=g) * 3).to(dtype)


@pytest.fixture(params=[None, 7 * 16], ids=["one-block", "tiny-blocks"])
def block_size(request, monkeypatch):
    """Run a test with the default blocks and again with blocks of a few rows (many blocks, ragged end)."""
    if request.param is not None:
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", request.param)
    return request.param


def test_row_blocks_cover_the_rows_once_within_the_limit():
    cuts = row_blocks(3, 100, 16, elements=3 * 16 * 7)
    assert [(c.start, c.stop) for c in cuts][:2] == [(0, 7), (7, 14)]
    assert cuts[-1] == slice(98, 100)
    assert sum(c.stop - c.start for c in cuts) == 100
    assert row_blocks(4, 5, 10, elements=1) == [slice(i, i + 1) for i in range(5)]  # at least one row


@pytest.mark.parametrize("seed", range(3))
def test_fps_equals_the_literal_procedure(seed, block_size):
    x = _tokens(3, 150, 24, seed)
    start = torch.tensor([0, 17, 149])
    ours = fps_indices(x, 12, start)
    for b in range(3):
        assert ours[b].tolist() == literal_fps(x[b], 12, int(start[b]))


def test_fps_distances_are_exact_for_duplicates(block_size):
    # 4 distinct tokens repeated: after 4 picks every distance is exactly 0, so the literal procedure
    # (and ours) picks the first position; an |x|^2 - 2 x.c + |c|^2 expansion would pick by rounding noise
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(4, 16, generator=g) * 40
    x = distinct[torch.arange(60) % 4].unsqueeze(0)
    ours = fps_indices(x, 7, torch.tensor([5]))[0].tolist()
    assert ours == literal_fps(x[0], 7, 5)
    assert ours[4:] == [0, 0, 0]


def test_fps_on_half_tokens_measures_in_float32(block_size):
    x = _tokens(2, 90, 16, 3, torch.float16)
    ours = fps_indices(x, 9, torch.tensor([4, 40]))
    for b in range(2):
        assert ours[b].tolist() == literal_fps(x[b].float(), 9, [4, 40][b])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_qr_pivots_factor_and_downdated_residuals(dtype, block_size):
    x = _tokens(2, 120, 40, 5, dtype)
    qr = qr_pivots(x, 8)
    exact = x.double()
    for b in range(2):
        _, _, piv = scipy.linalg.qr(exact[b].numpy().T, pivoting=True, mode="economic")
        assert qr.pivots[b].tolist() == piv[:8].tolist()
    ct = torch.promote_types(dtype, torch.float32)
    assert qr.factor.dtype == qr.residual.dtype == qr.norms.dtype == ct
    f = qr.scale.double()
    assert torch.equal(f, torch.exp2(torch.round(torch.log2(f))))  # a power of two
    scaled = exact * f
    s = batched_gather(scaled, qr.pivots)
    # L L_p^T is the Gram rows of the pivots; the residuals are those of least squares on the basis
    gram = qr.factor.double() @ batched_gather(qr.factor.double(), qr.pivots).transpose(1, 2)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(gram, scaled @ s.transpose(1, 2), rtol=tol, atol=tol)
    coef = torch.linalg.lstsq(s.transpose(1, 2), scaled.transpose(1, 2)).solution  # [B, M, N]
    residual = (scaled - coef.transpose(1, 2) @ s).square().sum(-1)
    torch.testing.assert_close(qr.residual.double(), residual, rtol=tol, atol=tol)
    torch.testing.assert_close(qr.norms.double(), scaled.square().sum(-1), rtol=tol, atol=tol)
    assert (qr.residual.gather(1, qr.pivots) == 0).all()


def test_qr_pivots_stay_finite_past_the_rank():
    x = torch.randn(1, 30, 3, generator=torch.Generator().manual_seed(0)) @ torch.randn(3, 12)  # rank 3
    qr = qr_pivots(x, 6)
    assert torch.isfinite(qr.factor).all() and (qr.residual >= 0).all()
    assert len(set(qr.pivots[0].tolist())) == 6  # a pivot is never chosen twice
    zeros = torch.zeros(2, 20, 8)
    qr = qr_pivots(zeros, 4)
    assert qr.pivots.tolist() == [[0, 1, 2, 3]] * 2 and torch.equal(qr.factor, torch.zeros(2, 20, 4))
    assert torch.equal(pivoted_ridge_errors(qr, 1e-5), torch.zeros(2, 20))
    assert torch.equal(tc.create("apet", basis="qr", num_basis=4).compress(zeros, 6).tokens, torch.zeros(2, 6, 8))


def test_pivoted_ridge_errors_by_hand():
    # one pivot, (3, 4) of norm 5; ridge 25: c = s.x / (25 + 25), error |x - c s|
    # (3, 0): c = 0.18, residual (2.46, -0.72), error^2 = 6.57; (0, 2): c = 0.16, residual (-0.48, 1.36),
    # error^2 = 2.08; the pivot itself: c = 0.5, error 2.5
    x = torch.tensor([[[3.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])
    qr = qr_pivots(x, 1)
    assert qr.pivots.tolist() == [[2]]
    expected = torch.tensor([[6.57, 2.08, 6.25]]).sqrt()
    torch.testing.assert_close(pivoted_ridge_errors(qr, 25.0), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(pivoted_ridge_errors(qr, 25.0, "relative"), expected / torch.tensor([3.0, 2.0, 5.0]))
    with pytest.raises(ValueError, match="norm 'l1' needs the residual rows; allowed here: 'l2', 'relative'"):
        pivoted_ridge_errors(qr, 25.0, "l1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("ridge", [1e-5, 1.0, 300.0])
def test_pivoted_ridge_errors_equal_the_residual_norms(dtype, ridge, block_size):
    x = _tokens(2, 150, 24, 8, dtype) * 3
    qr = qr_pivots(x, 7)
    s = batched_gather(x.double(), qr.pivots)
    for norm in ("l2", "relative"):
        expected = residual_errors(ridge_residual(x.double(), s, ridge), x.double(), norm)
        ours = pivoted_ridge_errors(qr, ridge, norm)
        assert ours.dtype == qr.factor.dtype
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(ours.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_pivoted_ridge_errors_of_an_explained_token_are_small():
    # a token in the span of the basis has error ~0: with downdated residuals at most ~sqrt(M eps) |x|
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 40, 16, generator=g)
    x[0, :2] *= 10  # the first two pivots
    x[0, 7] = 0.05 * x[0, 0] - 0.02 * x[0, 1]
    qr = qr_pivots(x, 12)
    assert qr.pivots[0, :2].tolist() == [0, 1] or qr.pivots[0, :2].tolist() == [1, 0]
    errors = pivoted_ridge_errors(qr, 1e-5)
    assert errors[0, 7] <= (12 * torch.finfo(torch.float32).eps) ** 0.5 * x[0, 7].norm()
    assert errors[0, 7] < 1e-3 * errors[0].median()


@pytest.mark.parametrize("norm", ["l2", "l1", "linf", "relative"])
def test_ridge_errors_equal_the_residual_norms(norm, block_size):
    x = _tokens(2, 130, 20, 1)
    s = batched_gather(x, torch.tensor([[0, 5, 9], [3, 3, 100]]))
    expected = residual_errors(ridge_residual(x, s, 1e-3), x, norm)
    torch.testing.assert_close(ridge_errors(x, s, 1e-3, norm), expected, rtol=1e-5, atol=1e-5)


def test_ridge_errors_of_half_tokens_are_float32(block_size):
    x = _tokens(1, 64, 16, 2, torch.float16)
    s = batched_gather(x, torch.tensor([[1, 2, 3]])).float()
    errors = ridge_errors(x, s, 1e-5, "l2")
    assert errors.dtype == torch.float32
    torch.testing.assert_close(errors, ridge_errors(x.float(), s, 1e-5, "l2"))


def test_rows_matmul_reads_half_tokens_in_float32(block_size):
    x = _tokens(2, 50, 8, 4, torch.float16)
    w = torch.randn(2, 8, 3)
    out = rows_matmul(x, w)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() @ w)


@pytest.mark.parametrize("count", [100, 30])  # every token matched in place / the rows gathered
def test_merge_rows_equals_match_then_mean(block_size, count):
    x = _tokens(2, 140, 12, 6)
    dst = _tokens(2, 9, 12, 7)
    rows = torch.stack([torch.randperm(140, generator=torch.Generator().manual_seed(i))[:count] for i in range(2)])
    merged, match = merge_rows(dst, x, rows)
    # the sums add the rows in ascending position, whatever their order: the two ways agree bit for bit
    with_norms, _ = merge_rows(dst, x, rows.flip(1), dst.norm(dim=-1))
    assert torch.equal(with_norms, merged)
    src = batched_gather(x, rows)
    expected_match = (F.normalize(src, dim=-1) @ F.normalize(dst, dim=-1).transpose(1, 2)).argmax(-1)
    assert torch.equal(match, expected_match)
    assert torch.equal(cosine_match(src, dst), expected_match)
    torch.testing.assert_close(merged, mean_merge(dst, src, match))
    # by hand: each target is (itself + its matches) / (1 + count)
    for b in range(2):
        for t in range(9):
            group = torch.cat([dst[b, t : t + 1], src[b, match[b] == t]])
            torch.testing.assert_close(merged[b, t], group.mean(0))


def test_batched_gather_equals_torch_gather():
    x = _tokens(3, 20, 5, 0)
    idx = torch.tensor([[0, 19, 3], [5, 5, 1], [2, 0, 7]])
    expected = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, 5))
    assert torch.equal(batched_gather(x, idx), expected)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    assert torch.equal(batched_gather(strided, idx), expected)


def test_finite_check_is_exact_when_the_sum_overflows():
    big = torch.full((1, 64, 64), 60000.0, dtype=torch.float16)  # finite values, infinite half sum
    assert not torch.isfinite(big.sum())
    check_tokens("t", big)  # accepted
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = big.clone()
        x[0, 3, 7] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            check_tokens("t", x)


def test_apet_on_half_tokens_never_copies_them_to_float32(monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1 << 14)
    x = _tokens(1, 4096, 128, 0, torch.float16)
    _, peak = peak_memory(lambda: tc.create("apet").compress(x, 256))
    assert peak < 0.6 * x.numel() * 4  # well below one float32 copy (2x the half input)


def test_apet_memory_does_not_grow_faster_than_the_input():
    ratios = []
    for n in (2048, 8192):
        x = _tokens(1, n, 256, 1)
        _, peak = peak_memory(lambda x=x, n=n: tc.create("apet").compress(x, n // 8))
        ratios.append(peak / (x.numel() * 4))
    assert max(ratios) < 3.0
    assert ratios[1] < ratios[0] * 1.2


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(9, 80), st.integers(12, 40), st.integers(1, 300))
def test_apet_output_does_not_depend_on_the_block_size(seed, n, d, block):
    # below the tokens' rank, and K <= N - M (n >= 9), so no kept token is one whose error is rounding
    # noise (the basis tokens' own, ~1e-6), whose order no kernel fixes
    x = _tokens(2, n, d, seed)
    k = max(5, n // 3)
    comp = tc.create("apet", num_basis=4)
    reference = comp.compress(x, k)
    old = blocks.BLOCK_ELEMENTS
    try:
        blocks.BLOCK_ELEMENTS = block
        blocked = comp.compress(x, k)
    finally:
        blocks.BLOCK_ELEMENTS = old
    assert torch.equal(blocked.indices, reference.indices)
    torch.testing.assert_close(blocked.tokens, reference.tokens)


# ----------------------------------------------------------------------------------------- matvec


@pytest.mark.parametrize(
    "n,padded", [(1, 64), (64, 64), (65, 128), (257, 320), (576, 576), (577, 640), (1025, 1152), (18432, 18432)]
)
def test_padded_rows_by_hand(n, padded):
    # Four pieces up to 1024 rows, eight up to 2048, ...: 257 rows are 4 pieces of 16 * ceil(257 / 64) = 80
    # rows, 577 are 4 of 160, 1025 are 8 of 16 * ceil(1025 / 128) = 144, 18432 are 72 of 256.
    assert tc.kernels.padded_rows(n) == padded


@given(n=st.integers(1, 100_000))
def test_padded_rows_are_equal_aligned_pieces(n):
    from tokencomp.kernels.matvec import PIECE_ALIGN, PIECE_GROUP, PIECE_ROWS
    from tokencomp.kernels.matvec import pieces as count

    rows = tc.kernels.padded_rows(n)
    pieces = count(n)
    assert pieces % PIECE_GROUP == 0 and (pieces == PIECE_GROUP or n > (pieces - PIECE_GROUP) * PIECE_ROWS)
    assert rows >= n and rows % (PIECE_ALIGN * pieces) == 0 and rows - n < PIECE_ALIGN * pieces
    assert rows // pieces <= PIECE_ROWS
    assert tc.kernels.padded_rows(rows) == rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_unit_rows_with_padding_rows(block_size, dtype):
    x = _tokens(2, 37, 9, 4, dtype)
    x[1, 5] = 0.0
    padded = tc.kernels.unit_rows(x, rows=48)
    assert padded.shape == (2, 48, 9) and padded.dtype == torch.float32
    assert torch.equal(padded[:, :37], tc.kernels.unit_rows(x))
    assert not padded[:, 37:].any()
    with pytest.raises(ValueError, match="rows=36 is fewer than the 37 tokens"):
        tc.kernels.unit_rows(x, rows=36)


@pytest.mark.parametrize("b,n,d", [(1, 1, 5), (1, 300, 96), (3, 577, 40), (2, 1000, 1024)])
def test_token_dots_are_the_dot_products(b, n, d):
    x = tc.kernels.unit_rows(_tokens(b, n, d, n), rows=tc.kernels.padded_rows(n))
    vec = _tokens(b, 1, d, 1)[:, 0]
    out = tc.kernels.token_dots(x, vec, torch.full(x.shape[:2], float("nan")))
    exact = (x.double() @ vec.double().unsqueeze(-1))[..., 0]
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)
    assert not out[:, n:].any()  # zero padding rows


def test_qr_pivots_read_float32_tokens_in_place_given_their_norms():
    x = _tokens(2, 64, 24, 4) * 3  # padded_rows(64) == 64
    norms, scale, ok = tc.kernels.norm_scale(x)
    assert ok.all()
    given = qr_pivots(x, 5, scale, (norms * scale.view(-1, 1)).square_())
    copied = qr_pivots(x, 5)
    assert given.tokens.data_ptr() == x.data_ptr() and torch.equal(given.tokens_scale, torch.ones(2, 1, 1))
    assert torch.equal(copied.tokens, x * copied.scale) and torch.equal(copied.tokens_scale, copied.scale)
    assert torch.equal(given.pivots, copied.pivots)
    # the same factorisation of the tokens scaled by another power of two
    ratio = (given.scale / copied.scale).view(2, 1, 1)
    torch.testing.assert_close(given.factor, copied.factor * ratio, rtol=1e-6, atol=0)
    half = qr_pivots(x.half(), 5, scale, (norms * scale.view(-1, 1)).square_())
    assert half.tokens.dtype == torch.float32 and torch.equal(half.tokens_scale, scale)  # copied
    with pytest.raises(ValueError, match="give both scale and norms"):
        qr_pivots(x, 5, scale)


def test_norm_scale_vouches_for_rows_of_ordinary_size_only():
    x = _tokens(6, 5, 8, 3)
    x[1] *= 1e30  # squared norms overflow float32
    x[2] *= 1e-30  # and vanish
    x[3] = 0.0
    x[4, 2, 3] = float("nan")
    x[5, 0, 0] = float("inf")
    norms, scale, ok = tc.kernels.norm_scale(x)
    assert ok.tolist() == [True, False, False, False, False, False]
    torch.testing.assert_close(norms[0].double(), x[0].double().norm(dim=-1))
    largest = norms[0].max() * scale[0, 0, 0]
    assert 0.5 <= largest < 1.0 and torch.log2(scale[0]).item().is_integer()
    half_norms, _, half_ok = tc.kernels.norm_scale(x[:1].half())
    assert half_norms.dtype == torch.float32 and half_ok.all()


@contextlib.contextmanager
def _threads(count: int):
    """PyTorch on ``count`` threads inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("d", [5, 96, 1024])
def test_token_dots_do_not_depend_on_threads(d):
    # The pieces depend on N only: the values are bit for bit those of one thread.
    x = tc.kernels.unit_rows(_tokens(1, 1100, d, 7), rows=tc.kernels.padded_rows(1100))
    vec = _tokens(1, 1, d, 8)[:, 0]
    with _threads(1):
        one = tc.kernels.token_dots(x, vec, torch.empty(x.shape[:2]))
    assert torch.equal(tc.kernels.token_dots(x, vec, torch.empty(x.shape[:2])), one)


def test_token_dots_need_padded_rows():
    with pytest.raises(ValueError, match=r"pad the tokens with zero rows to padded_rows\(300\) = 320"):
        tc.kernels.token_dots(torch.zeros(1, 300, 4), torch.zeros(1, 4), torch.empty(1, 300))


@pytest.mark.parametrize("d", [5, 96, 1024])
@pytest.mark.parametrize("n", [1, 12, 13, 100, 577])
def test_column_dots_are_dot_products_in_any_pieces_and_threads(n, d):
    # One image's columns cut into pieces: every entry is the dot product to float32 accuracy, whatever
    # the pieces, the padding columns are 0, and with the same pieces (column_pieces: 4 for one image on
    # CPU) the thread count changes nothing. One piece is MKL's gemv, which splits the sum by thread.
    x = _tokens(1, n, d, n)
    vec = _tokens(1, 1, d, 1)[:, 0]
    exact = (x.double() @ vec.double().unsqueeze(-1))[..., 0]
    bound = d * 2e-7 * x.double().norm(dim=-1) * vec.double().norm()  # float32 dot product error
    for pieces in (1, 2, 3, 4, 8):
        cols = torch.zeros(1, d, tc.kernels.padded_columns(n, pieces))
        cols[:, :, :n] = x.transpose(1, 2)
        runs = []
        for threads in (1, 2):
            with _threads(threads):
                runs.append(tc.kernels.column_dots(cols, vec, pieces, torch.full((1, cols.shape[2]), float("nan"))))
        assert not runs[0][:, n:].any()
        assert ((runs[0][:, :n].double() - exact).abs() <= bound).all()
        assert pieces == 1 or torch.equal(runs[0], runs[1])


def test_column_dots_batches_and_their_checks(monkeypatch):
    cols, vecs = _tokens(3, 16, 32, 2), _tokens(3, 1, 16, 3)[:, 0]  # [3, D=16, N=32]
    out = tc.kernels.column_dots(cols, vecs, 1, torch.empty(3, 32))
    for b in range(3):
        torch.testing.assert_close(out[b], vecs[b] @ cols[b])
    with pytest.raises(ValueError, match="use pieces=1 for a batch"):
        tc.kernels.column_dots(cols, vecs, 2, torch.empty(3, 32))
    with pytest.raises(ValueError, match=r"pad to padded_columns\(30, pieces\)"):
        tc.kernels.column_dots(cols[:, :, :30].contiguous(), vecs, 1, torch.empty(3, 30))
    assert [tc.kernels.padded_columns(n, p) for n, p in ((1, 1), (16, 1), (17, 2), (64, 3))] == [16, 16, 32, 96]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert tc.kernels.column_pieces(1, torch.device("cpu")) == 4  # not the thread count
    assert tc.kernels.column_pieces(2, torch.device("cpu")) == 1  # a batch runs its rows in parallel
    assert tc.kernels.column_pieces(1, torch.device("meta")) == 1  # one product fills a device
