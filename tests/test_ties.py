"""Ties are broken by the documented rule: towards the lower position.

Identical tokens under uniform attention (and equal key norms) tie in every score, distance and norm a
strategy ranks by, so the kept positions show the tie rule alone.
"""

from __future__ import annotations

import pytest
import torch

import tokencomp as tc
from tokencomp.testing import make_context

N, K = 16, 4


def _tied(name: str, params: dict) -> tc.CompressionResult:
    x = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(0)).expand(2, N, 8).contiguous()
    comp = tc.create(name, **params)
    ctx = make_context(comp, x)
    fields = {f: getattr(ctx, f) for f in ("cls_attention", "text_attention", "cross_attention", "query", "keys")}
    for f in ("cls_attention", "text_attention", "cross_attention"):
        if fields[f] is not None:
            fields[f] = torch.full_like(fields[f], 1 / N)
    if fields["query"] is not None:
        fields["query"] = torch.zeros_like(fields["query"])  # a zero query attends uniformly
    if fields["keys"] is not None:
        fields["keys"] = torch.ones_like(fields["keys"])  # equal key norms (DART's pivots)
    return comp.compress(x, K, ctx.replace(**fields))


LOWEST_FIRST = [
    ("fastv", {}),
    ("pdrop", {}),
    ("sparsevlm", {}),
    ("visionzip", {"contextual": 0}),
    ("vispruner", {"important_ratio": 1.0}),
    ("divprune", {}),
    ("cdpruner", {}),
    ("dart", {"pivot_image_tokens": 1}),
    ("dart-llm", {"pivot_image_tokens": 1}),
    ("prumerge", {"knn": 3}),
    ("apet", {"num_basis": 2, "fps_start": 0}),
    ("apet", {"num_basis": 2, "basis": "qr"}),
]


@pytest.mark.parametrize("name,params", LOWEST_FIRST, ids=lambda v: v if isinstance(v, str) else str(v))
def test_ties_keep_the_lowest_positions(name, params):
    result = _tied(name, params)
    assert result.indices.tolist() == [list(range(K))] * 2


def test_prumerge_neighbour_ties_go_to_the_lower_positions():
    # every other token is an equally similar neighbour of each centre: the lowest free positions are taken
    result = _tied("prumerge", {"knn": 3, "extra_token": False})
    assert result.info["neighbours"][0].tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
