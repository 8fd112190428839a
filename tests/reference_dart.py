"""A literal re-statement of DART's ``get_retained_image_token`` (authors' code, one sample).

Two changes, both documented in ``strategies/dart.py``: the pivots are visited in a fixed order (image
pivots by descending key norm, then text pivots) instead of a Python set's hash order, and each pivot's
claim count may be given per pivot (``quotas``) to hit an exact budget; with ``quotas=None`` every pivot
claims ``max_num_trunction // P`` as in the authors' code.
"""

from __future__ import annotations

import torch


def literal_dart(
    keys: torch.Tensor,
    last_layer_state: torch.Tensor,
    image_token_start_index: int,
    image_token_length: int,
    pivot_image_token: int,
    pivot_text_token: int,
    max_num_trunction: int = 0,
    quotas: list[int] | None = None,
) -> list[int]:
    """Kept image positions (sequence positions, ascending). ``keys`` ``[H, L, Dh]``, states ``[L, D]``."""
    token_topk = int(max_num_trunction // (pivot_image_token + pivot_text_token))
    k_states = keys.permute(1, 0, 2).reshape(keys.shape[1], -1)  # [L, H * Dh]
    k_image = k_states[image_token_start_index : image_token_start_index + image_token_length, :]
    k_query = k_states[image_token_start_index + image_token_length :, :]
    image_norm = torch.norm(k_image, p=1, dim=-1)
    query_norm = torch.norm(k_query, p=1, dim=-1)
    image_indices = (image_norm.topk(pivot_image_token).indices + image_token_start_index).tolist()
    query_indices = []
    if pivot_text_token > 0:
        query_indices = (
            query_norm.topk(pivot_text_token).indices + image_token_start_index + image_token_length
        ).tolist()
    pivots_in_order = image_indices + query_indices
    indices_set = set(pivots_in_order)
    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length))
    valid_indices.difference_update(image_indices)
    for p, item in enumerate(pivots_in_order):
        claim = token_topk if quotas is None else quotas[p]
        if claim == 0:
            continue
        valid_indices_list = list(valid_indices)
        valid_vectors = last_layer_state[valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(claim).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices.tolist()]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)
