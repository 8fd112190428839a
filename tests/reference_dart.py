"""Literal re-statements of DART's ``get_retained_image_token`` (authors' code, one sample).

Authors: ``ZichenWen1/DART``, ``llava/model/language_model/modeling_llama_self.py``, method
``DART.get_retained_image_token`` (l. 397-450 at commit ``9fee9fa``, the authors' last change to that file;
read from the fork ``xqy1111111/DART``, which carries their history). Written afresh here, with
``keys`` ``[H, L, Dh]`` and ``last_layer_state`` ``[L, D]`` for their batch row 0.

- :func:`authors_dart` is their loop as written: the pivots visited in ``list(set(...))`` order, one
  ``TOKEN_TOPK`` for every pivot; it returns the kept positions and the visiting order.
- :func:`literal_dart` is the same loop with two documented changes (``strategies/dart.py``): the pivots
  may be visited in a fixed order (``set_order=False``: image then text pivots, by descending norm), and
  each pivot's claim count may be given per visit (``quotas``) to hit an exact budget.
- :func:`authors_kept_count` is their budget arithmetic: how many image tokens their code keeps.
"""

from __future__ import annotations

import math

import torch


def _pivots(keys, image_token_start_index, image_token_length, pivot_image_token, pivot_text_token):
    any_states = keys.permute(1, 0, 2).reshape(keys.shape[1], -1)  # [L, H * Dh], heads concatenated
    k_image = any_states[image_token_start_index : image_token_start_index + image_token_length, :]
    k_query = any_states[image_token_start_index + image_token_length :, :]
    image_norm = torch.norm(k_image, p=1, dim=-1)
    query_norm = torch.norm(k_query, p=1, dim=-1)
    image_indices = (image_norm.topk(pivot_image_token).indices + image_token_start_index).tolist()
    query_indices = (query_norm.topk(pivot_text_token).indices + image_token_start_index + image_token_length).tolist()
    return image_indices, query_indices


def authors_token_topk(image_token_length, pivot_image_token, pivot_text_token, max_num_trunction, reduction_ratio):
    """Their ``TOKEN_TOPK``: tokens each pivot claims."""
    setting = max_num_trunction if max_num_trunction is not None else (image_token_length * (1 - reduction_ratio))
    return math.ceil(setting // (pivot_image_token + pivot_text_token))


def authors_dart(
    keys: torch.Tensor,
    last_layer_state: torch.Tensor,
    image_token_start_index: int,
    image_token_length: int,
    pivot_image_token: int,
    pivot_text_token: int,
    max_num_trunction: int | None = None,
    reduction_ratio: float | None = None,
) -> tuple[list[int], list[int]]:
    """(kept image positions ascending, pivots' positions in the order visited), as their code runs."""
    token_topk = authors_token_topk(
        image_token_length, pivot_image_token, pivot_text_token, max_num_trunction, reduction_ratio
    )
    image_indices, query_indices = _pivots(
        keys, image_token_start_index, image_token_length, pivot_image_token, pivot_text_token
    )
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length)) - set(
        image_indices
    )
    visited = []
    valid_indices_list = list(valid_indices)
    for item in list(indices_set):
        visited.append(item)
        valid_vectors = last_layer_state[valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(token_topk).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return sorted(indices_set), visited


def literal_dart(
    keys: torch.Tensor,
    last_layer_state: torch.Tensor,
    image_token_start_index: int,
    image_token_length: int,
    pivot_image_token: int,
    pivot_text_token: int,
    max_num_trunction: int = 0,
    quotas: list[int] | None = None,
    set_order: bool = True,
) -> list[int]:
    """Kept image positions (ascending); ``quotas[v]`` is the claim of the ``v``-th pivot visited."""
    token_topk = int(max_num_trunction // (pivot_image_token + pivot_text_token))
    image_indices, query_indices = _pivots(
        keys, image_token_start_index, image_token_length, pivot_image_token, pivot_text_token
    )
    indices_set = set(image_indices + query_indices)
    visit = list(indices_set) if set_order else image_indices + query_indices
    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length))
    valid_indices.difference_update(image_indices)
    for v, item in enumerate(visit):
        claim = token_topk if quotas is None else quotas[v]
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


def authors_kept_count(
    image_token_length: int,
    pivot_image_token: int,
    pivot_text_token: int,
    max_num_trunction: int | None = None,
    reduction_ratio: float | None = None,
) -> int:
    """Image tokens their code keeps: the image pivots plus ``TOKEN_TOPK`` claims per pivot."""
    token_topk = authors_token_topk(
        image_token_length, pivot_image_token, pivot_text_token, max_num_trunction, reduction_ratio
    )
    return pivot_image_token + (pivot_image_token + pivot_text_token) * token_topk
