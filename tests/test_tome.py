"""ToMe: fidelity to the authors' rounds of bipartite soft matching, a hand-worked example, chunks, errors."""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from reference_tome import literal_tome


def check_against_literal(x, k, protect_first=False, chunk=2048):
    result = tc.create("tome", protect_first=protect_first, chunk=chunk).compress(x, k)
    for b in range(x.shape[0]):
        tokens, sizes, sources = literal_tome(x[b], k, class_token=protect_first)
        # the literal order is the authors'; ours is by representative position: match groups by members
        groups = [frozenset(s) for s in sources]
        ours = [frozenset(i for i in range(x.shape[1]) if int(result.assignment[b, i]) == slot) for slot in range(k)]
        assert set(ours) == set(groups)
        for slot, members in enumerate(ours):
            j = groups.index(members)
            torch.testing.assert_close(result.tokens[b, slot], tokens[j], rtol=1e-5, atol=1e-5)
            assert int(result.info["size"][b, slot]) == int(sizes[j]) == len(members)
            assert int(result.indices[b, slot]) in members


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n,d,k", [(576, 32, 64), (576, 16, 192), (577, 8, 300), (50, 4, 1), (9, 3, 4)])
def test_equals_literal_authors_rounds(seed, n, d, k):
    g = torch.Generator().manual_seed(seed)
    check_against_literal(torch.randn(2, n, d, generator=g), k)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("k", [2, 3, 64, 100])
def test_protect_first_equals_literal_class_token(seed, k):
    g = torch.Generator().manual_seed(10 + seed)
    x = torch.randn(2, 101, 8, generator=g)
    check_against_literal(x, k, protect_first=True)
    result = tc.create("tome", protect_first=True).compress(x, k)
    assert result.indices[:, 0].tolist() == [0, 0] and result.info["size"][:, 0].tolist() == [1, 1]


def test_hand_worked_example():
    # A = tokens 0, 2; B = tokens 1, 3. Token 0 is 5.7 degrees from token 1, token 2 is 16.7 degrees from
    # token 3, so with one merge (k = 3) token 0 merges into token 1 and the others stay.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.3, 1.0]])
    one = tc.create("tome").compress(x, 3)
    assert one.indices.tolist() == [1, 2, 3]
    assert one.assignment.tolist() == [0, 0, 1, 2]
    torch.testing.assert_close(one.tokens, torch.tensor([[1.0, 0.05], [0.0, 1.0], [0.3, 1.0]]))
    assert one.info["size"].tolist() == [2, 1, 1]
    # k = 2: one round merges both A tokens (r = min(2, 4 // 2))
    two = tc.create("tome").compress(x, 2)
    assert two.indices.tolist() == [1, 3] and two.assignment.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(two.tokens, torch.tensor([[1.0, 0.05], [0.15, 1.0]]))


def test_sizes_weight_later_rounds():
    # Three identical-direction tokens and one apart: after the first round the merged pair has size 2,
    # so merging it with the third token gives (2 * pair + third) / 3, the mean of all three.
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [4.0, 0.0], [0.0, 1.0], [0.0, 5.0], [0.0, 3.0]])
    result = tc.create("tome").compress(x, 2)
    groups = {frozenset(i for i in range(6) if int(result.assignment[i]) == s): s for s in range(2)}
    assert set(groups) == {frozenset({0, 1, 2}), frozenset({3, 4, 5})}
    torch.testing.assert_close(result.tokens[groups[frozenset({0, 1, 2})]], torch.tensor([7 / 3, 0.0]))
    torch.testing.assert_close(result.tokens[groups[frozenset({3, 4, 5})]], torch.tensor([0.0, 3.0]))


@pytest.mark.parametrize("chunk", [1, 5, 100])
def test_chunk_does_not_change_the_result(chunk):
    x = torch.randn(2, 300, 8, generator=torch.Generator().manual_seed(3))
    ref = tc.create("tome").compress(x, 40)
    out = tc.create("tome", chunk=chunk).compress(x, 40)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.assignment, ref.assignment)
    torch.testing.assert_close(out.tokens, ref.tokens)


def test_errors_and_params():
    with pytest.raises(ValueError, match="at least 2"):
        tc.create("tome", protect_first=True).compress(torch.randn(10, 4), 1)
    with pytest.raises(tc.InvalidParameterError, match="protect_first"):
        tc.create("tome", protect_first="yes")
    with pytest.raises(tc.InvalidParameterError, match="chunk"):
        tc.create("tome", chunk=0)
    assert tc.create("tome").get_params() == {"protect_first": False, "chunk": 2048}


@pytest.mark.parametrize("protect_first", [False, True])
def test_tiny_blocks_and_half_tokens_do_not_change_the_result(monkeypatch, protect_first):
    """Chunks split into row-block pieces (of >= 12 rows) and half tokens normalised block by block
    give bit for bit the result of whole chunks on the float32 copy."""
    import tokencomp.kernels.blocks as blocks

    x = torch.randn(2, 700, 24, generator=torch.Generator().manual_seed(5))
    comp = tc.create("tome", protect_first=protect_first)
    ref = comp.compress(x, 60)
    half_ref = comp.compress(x.half().float(), 60)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 3000)  # pieces of 12 or a few more rows
    for out, want in ((comp.compress(x, 60), ref), (comp.compress(x.half(), 60), half_ref)):
        assert torch.equal(out.indices, want.indices) and torch.equal(out.assignment, want.assignment)
        assert torch.equal(out.info["size"], want.info["size"])
        assert torch.equal(out.tokens, want.tokens.to(out.tokens.dtype))


def test_peak_memory_is_bounded(monkeypatch):
    """A round holds the normalised metric and one block of similarities, freed before the merge, which
    forms the size-weighted sums in its output: about N D floats in all. The earlier code also made a
    weighted copy of all tokens and held a whole 2048-row chunk of similarities, and fails this."""
    import tokencomp.kernels.blocks as blocks
    from tokencomp.analysis.measure import peak_memory

    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1 << 15)
    n, d = 2304, 128
    x = torch.randn(1, n, d, generator=torch.Generator().manual_seed(0))
    _, peak = peak_memory(lambda: tc.create("tome").compress(x, n // 8))
    assert peak / 4 < 1.15 * n * d + blocks.BLOCK_ELEMENTS, peak / 4 / (n * d)
