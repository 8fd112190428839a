"""The authors' selection code, restated literally and batched as theirs, to run in half precision.

Each function runs the authors' tensor operations in whatever dtype its inputs have, as their code does in a
float16 model, so that ``compute_dtype="input"`` can be compared with it in float16 / bfloat16 and
``compute_dtype="float32"`` with it on float32 inputs. Written from the authors' repositories:

- VisPruner, ``Theia-4869/VisPruner`` (``aefa01a``), ``llava/model/llava_arch.py`` ``encode_images``;
- VisionZip, ``dvlab-research/VisionZip`` (``3151f6d``), ``visionzip/clip_encoder.py``
  ``CLIPVisionTower_VisionZip.forward``;
- PyramidDrop, ``Cooperx521/PyramidDrop`` (``6444f30``), ``llava/model/modeling_llama_pdrop.py``
  ``pdrop_rank_drop`` (inference branch);
- FastV, ``pkunlp-icler/FastV`` (``d165972``), ``src/transformers/src/transformers/models/llama/
  modeling_llama.py`` (``use_fast_v`` branch of ``LlamaModel.forward``) and the attention weights of the
  same file's eager ``LlamaAttention`` (softmax in float32, cast back to the model's dtype).

One change everywhere: where the authors rank with ``topk`` or a non-stable ``argsort`` (the order of equal
scores unspecified), these rank with a stable descending sort, ties to the lower index, which is the tie
rule of tokencomp. Half precision makes exact ties common, so without it no comparison would be defined.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``scores.topk(k).indices`` with ties to the lower index (see the module notes)."""
    return scores.argsort(dim=-1, descending=True, stable=True)[..., :k]


def authors_vispruner(
    image_features: torch.Tensor, image_attentions: torch.Tensor, visual_token_num: int, important_ratio: float = 0.5
) -> torch.Tensor:
    """``encode_images``: the kept index mask ``[B, N]`` of features ``[B, N, C]``, [CLS] attentions ``[B, H, N]``."""
    B, N, C = image_features.shape
    device = image_features.device

    important_token_num = int(visual_token_num * important_ratio)  # T_imp = T * r
    diverse_token_num = visual_token_num - important_token_num  # T_div = T * (1 - r)

    # [VisPruner] Select important tokens using attention scores
    image_attentions = image_attentions.mean(dim=1)  # (B, N)
    token_indices = image_attentions.argsort(dim=-1, descending=True, stable=True)  # (B, N)
    important_indices = token_indices[:, :important_token_num]  # (B, T_imp)
    residual_indices = token_indices[:, important_token_num:]  # (B, N - T_imp)

    # [VisPruner] Remove duplicate tokens by iterative matching and pruning
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)  # (B, N, C)
    while diverse_token_num > 0:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break

        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]  # (B, R, C)
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]  # (B, R // 2, C)
        scores = a @ b.transpose(-1, -2)  # (B, R // 2, R // 2)
        scores = scores.max(dim=-1).values  # (B, R // 2)

        distinct_indices = scores.argsort(dim=-1, descending=True, stable=True)[:, r:]  # (B, R // 2 - r)
        residual_indices = torch.cat(
            [
                residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices],
                residual_indices[..., 1::2],
            ],
            dim=-1,
        )  # (B, R - r)

    if diverse_token_num > 0:
        selected_indices = torch.cat([important_indices, residual_indices], dim=-1)  # (B, T)
    else:
        selected_indices = important_indices  # (B, T)
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
    index_masks.scatter_(1, selected_indices, True)
    return index_masks


def authors_visionzip(hidden_states: torch.Tensor, attn_weights: torch.Tensor, dominant_num: int, contextual_num: int):
    """``forward`` from "Dominant Visual Tokens" on, for patch tokens ``[B, N, C]`` and [CLS] attentions ``[B, H, N]``.

    Our tokens have no [CLS] and stand in for the keys (``metric``), as in tokencomp's VisionZip: the
    [CLS] index and its ``+ 1`` are gone. Returns ``(dominant, targets, match, contextual_tokens)``: the
    dominant mask ``[B, N]``, the targets' positions ``[B, C]``, the index into the targets of each other
    remaining token ``[B, M - C]`` (in ascending position) and the contextual tokens ``[B, C, D]``.
    """
    metric = hidden_states
    cls_attention = attn_weights
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = _top(cls_attention_sum, dominant_num)
    all_indices = topk_indices

    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool, device=metric.device).scatter_(
        1, all_indices, False
    )

    ### Filter
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - dominant_num, metric.shape[2])

    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        hidden_states.shape[0], hidden_states.shape[1] - dominant_num, hidden_states.shape[2]
    )

    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)

    ## Contextual Visual Tokens
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step, device=metric_normalized.device)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]

    others = ~torch.isin(torch.arange(metric_normalized.shape[1], device=metric_normalized.device), target_indices)
    tokens_to_merge = metric_normalized[:, others, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(
        tokens_to_merge.shape[0],
        tokens_to_merge.shape[1],
        contextual_num,
        dtype=hidden_states_filtered.dtype,
        device=metric_normalized.device,
    )
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, others, :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]

    contextual_tokens = target_hidden + aggregated_hidden

    remaining = mask.nonzero()[:, 1].view(hidden_states.shape[0], -1)  # the remaining positions, ascending
    return ~mask, remaining[:, target_indices], similarity.argmax(dim=2), contextual_tokens


def authors_pdrop_row(
    query_states: torch.Tensor,
    key_states: torch.Tensor,
    prompt_total_len: int,
    image_index: int,
    image_tokens: int,
    keep_length: int,
    attention_mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``pdrop_rank_drop`` "calculate attention map" to ``topk``, per batch row: the kept image positions.

    ``query_states`` / ``key_states`` ``[B, H, L, Dh]`` (rotary applied); ``attention_mask`` ``[B, L]``
    bool (the 2-D padding mask; the eager 4-D mask's row is 0 where a key may be attended, the dtype's
    minimum elsewhere: ``_prepare_4d_causal_attention_mask``).
    """
    bsz, num_heads, q_len, head_dim = query_states.shape
    out = []
    for i in range(bsz):
        cur_key_states = key_states[i]
        cur_query_states = query_states[i]
        allowed = torch.ones(q_len, q_len, dtype=torch.bool).tril()
        if attention_mask is not None:
            allowed = allowed & attention_mask[i][None, :]
        min_value = torch.finfo(query_states.dtype).min
        cur_eager_attention_mask = torch.zeros(1, q_len, q_len, dtype=query_states.dtype).masked_fill(
            ~allowed, min_value
        )

        text_query_states = cur_query_states[:, prompt_total_len - 1, :].unsqueeze(1)
        text_eager_attention_mask = cur_eager_attention_mask[:, prompt_total_len - 1, :].unsqueeze(1)

        # calculate attention map
        attn_weights = torch.matmul(text_query_states, cur_key_states.transpose(1, 2)) / math.sqrt(head_dim)
        attn_weights = attn_weights + text_eager_attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)

        attention_avg_head = torch.mean(attn_weights, dim=0)  # ave across heads
        attention_avg_head = attention_avg_head[:, image_index : image_index + image_tokens]
        attention_avg_text = torch.mean(attention_avg_head, dim=0)  # (576)

        # rank and drop by attention score
        top_rank_index = _top(attention_avg_text, keep_length)
        top_rank_index = top_rank_index + image_index
        out.append(top_rank_index.sort().values)
    return out


def eager_attention_weights(query_states: torch.Tensor, key_states: torch.Tensor) -> torch.Tensor:
    """``LlamaAttention.forward`` (eager, causal): the ``[B, H, L, L]`` weights in the inputs' dtype."""
    head_dim = query_states.shape[-1]
    q_len = query_states.shape[2]
    attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(head_dim)
    allowed = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    attention_mask = torch.zeros(q_len, q_len, dtype=query_states.dtype).masked_fill(
        ~allowed, torch.finfo(query_states.dtype).min
    )
    attn_weights = attn_weights + attention_mask
    return nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)


def authors_fastv(last_layer_attention: torch.Tensor, sys_length: int, image_token_length: int, attention_rank: int):
    """The ``use_fast_v`` branch at layer ``K``: the kept image positions (batch row 0, as the authors)."""
    # compute average attention over different head
    last_layer_attention_avg = torch.mean(last_layer_attention, dim=1)[0]
    # generate new attention mask based on the average attention, sample the top ATTENTION_RANK tokens
    last_layer_attention_avg_last_tok = last_layer_attention_avg[-1]
    # get the attention in image token
    last_layer_attention_avg_last_tok_image = last_layer_attention_avg_last_tok[
        sys_length : sys_length + image_token_length
    ]
    # get the indexs of the top ATTENTION_RANK tokens
    top_attention_rank_index = _top(last_layer_attention_avg_last_tok_image, attention_rank) + sys_length
    return top_attention_rank_index.sort().values
