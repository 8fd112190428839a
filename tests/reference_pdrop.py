"""A literal re-statement of PyramidDrop's position bookkeeping and inference loop (``Cooperx521/PyramidDrop``).

From ``llava/model/modeling_llama_pdrop.py``: ``LlamaModel.pdrop_forward`` (the decoder loop: a rank and
drop after each layer of ``layer_list`` in prefill, a shift of ``position_ids`` there in each decoding
step), ``pdrop_rank_drop`` (the last instruction token's attention row from the next layer's ``q_proj`` /
``k_proj``, ``topk``, and ``position_ids`` rebuilt as ``arange(cur_len)`` per row) and
``LlamaForCausalLM.prepare_inputs_for_generation`` (a step's position from the attention mask's cumulative
sum). ``image_token_ratio_list`` is the authors' list with its leading ``1.0`` (``model_vqa_loader.py``
inserts it), ``image_tokens`` / ``image_index`` / ``prompt_len`` what ``prepare_inputs_labels_for_multimodal_pdrop``
records (``llava_arch.py``).

Changes, none of which touches the positions: the decoder layers are transformers 5's (``cache`` in place
of ``past_key_value``, rotary embeddings passed in); the keys are repeated to the query heads for
grouped-query attention (Vicuna has none, so the authors' ``matmul`` broadcasts without it); the causal
mask is built for the current sequence (what the authors' SDPA / FlashAttention paths amount to for an
unpadded prompt, whose 2-D mask is all ones) and decoding steps attend to the whole cache; batch of one,
as their evaluation scripts.
"""

from __future__ import annotations

import math

import torch


def literal_generation_position_ids(attention_mask: torch.Tensor, past: bool) -> torch.Tensor:
    """``prepare_inputs_for_generation``: ``cumsum(mask) - 1``, pads at 1, the last column in decoding."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    if past:
        position_ids = position_ids[:, -1:]
    return position_ids


def literal_renumbered_position_ids(new_attention_mask: list[torch.Tensor], max_len: int) -> torch.Tensor:
    """``pdrop_rank_drop``'s new ``position_ids``: ``arange(cur_len)`` over each row's valid tokens, 0 after."""
    batch_size = len(new_attention_mask)
    position_ids = torch.zeros((batch_size, max_len), dtype=torch.long)
    for i in range(batch_size):
        cur_len = new_attention_mask[i].sum().item()
        position_ids[i, :cur_len] = torch.arange(0, cur_len, dtype=torch.long)
    return position_ids


def literal_decode_shift(position_ids, rank_layer: int, layer_list, image_token_ratio_list, image_tokens):
    """``pdrop_forward``'s decoding branch at ``rank_layer``: each row's position minus that stage's drop."""
    stage = layer_list.index(rank_layer)
    cur_visual_length = [int(cur_image_token * image_token_ratio_list[stage]) for cur_image_token in image_tokens]
    next_visual_length = [int(cur_image_token * image_token_ratio_list[stage + 1]) for cur_image_token in image_tokens]
    new_position_ids = []
    for idx, cur_position_ids in enumerate(position_ids):
        cur_position_ids = cur_position_ids - (cur_visual_length[idx] - next_visual_length[idx])
        new_position_ids.append(cur_position_ids)
    return new_position_ids


def literal_decode_positions(start: list[int], num_layers: int, layer_list, image_token_ratio_list, image_tokens):
    """The position each decoder layer is given in one decoding step whose position is ``start`` (per row)."""
    position_ids = [torch.tensor([s]) for s in start]
    seen = []
    for layer_idx in range(num_layers):
        seen.append([int(p) for p in position_ids])
        rank_layer = layer_idx + 1
        if rank_layer in layer_list:
            position_ids = literal_decode_shift(
                position_ids, rank_layer, layer_list, image_token_ratio_list, image_tokens
            )
    return seen


def _causal(length: int, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def literal_rank_drop(lm, rank_layer, features, position_ids, image_index, image_tokens, keep_length, prompt_len):
    """``pdrop_rank_drop`` (inference branch, one row): kept features and the renumbered ``position_ids``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    self_attn = lm.layers[rank_layer].self_attn
    hidden_states = lm.layers[rank_layer].input_layernorm(features.clone().detach())
    num_heads = lm.config.num_attention_heads
    num_key_value_heads = lm.config.num_key_value_heads
    head_dim = self_attn.head_dim
    bsz, q_len, _ = hidden_states.size()
    query_states = self_attn.q_proj(hidden_states).view(bsz, q_len, num_heads, head_dim).transpose(1, 2)
    key_states = self_attn.k_proj(hidden_states).view(bsz, q_len, num_key_value_heads, head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(hidden_states, position_ids)
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
    key_states = key_states.repeat_interleave(num_heads // num_key_value_heads, dim=1)  # GQA (see above)
    eager_attention_mask = _causal(q_len, hidden_states.dtype)

    cur_key_states, cur_query_states, cur_eager_attention_mask = key_states[0], query_states[0], eager_attention_mask[0]
    prompt_total_len = prompt_len + image_tokens
    text_query_states = cur_query_states[:, prompt_total_len - 1, :].unsqueeze(1)
    text_eager_attention_mask = cur_eager_attention_mask[:, prompt_total_len - 1, :].unsqueeze(1)
    attn_weights = torch.matmul(text_query_states, cur_key_states.transpose(1, 2)) / math.sqrt(head_dim)
    attn_weights = attn_weights + text_eager_attention_mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
    attention_avg_head = torch.mean(attn_weights, dim=0)
    attention_avg_head = attention_avg_head[:, image_index : image_index + image_tokens]
    attention_avg_text = torch.mean(attention_avg_head, dim=0)
    top_rank_index = attention_avg_text.topk(keep_length).indices
    top_rank_index = top_rank_index + image_index
    top_rank_index = top_rank_index.sort().values
    start_index = image_index + image_tokens
    row = features[0]
    new_input_embeds = torch.cat([row[:image_index, :], row[top_rank_index, :], row[start_index:, :]], dim=0)
    new_attention_mask = torch.ones(new_input_embeds.shape[0], dtype=torch.bool)
    position_ids = literal_renumbered_position_ids([new_attention_mask], new_input_embeds.shape[0])
    return position_ids, new_input_embeds[None]


def literal_pdrop_generate(
    model, inputs_embeds, image_index, n_image, layer_list, ratio_list, max_new_tokens, suppress
):
    """Greedy decoding through ``pdrop_forward``: the generated ids, each step's logits (before the
    ``suppress`` ids are masked out of the argmax) and each step's position ids per layer (``[step][layer]``)."""
    from transformers import DynamicCache

    lm = model.model.language_model
    image_token_ratio_list = [1.0] + list(ratio_list)
    image_tokens = [n_image]
    prompt_len = inputs_embeds.shape[1] - n_image  # the prompt's ids without the one image placeholder
    cache = DynamicCache(config=lm.config)
    attention_mask = torch.ones(1, inputs_embeds.shape[1], dtype=torch.long)
    hidden_states, generated, logits, positions = inputs_embeds, [], [], []
    for _step in range(max_new_tokens):
        past = cache.get_seq_length() > 0
        position_ids = literal_generation_position_ids(attention_mask, past)
        seen = []
        for layer_idx, decoder_layer in enumerate(lm.layers):
            seen.append(
                position_ids.tolist() if isinstance(position_ids, torch.Tensor) else [p.tolist() for p in position_ids]
            )
            ids = position_ids if isinstance(position_ids, torch.Tensor) else torch.stack(position_ids)
            mask = None if past else _causal(hidden_states.shape[1], hidden_states.dtype)
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask,
                position_ids=ids,
                cache=cache,
                use_cache=True,
                position_embeddings=lm.rotary_emb(hidden_states, ids),
            )
            rank_layer = layer_idx + 1
            if rank_layer in layer_list:
                stage = layer_list.index(rank_layer)
                if hidden_states.shape[1] != 1:
                    cur = int(n_image * image_token_ratio_list[stage])
                    keep_length = int(n_image * image_token_ratio_list[stage + 1])
                    position_ids, hidden_states = literal_rank_drop(
                        lm, rank_layer, hidden_states, position_ids, image_index, cur, keep_length, prompt_len
                    )
                else:
                    position_ids = literal_decode_shift(
                        position_ids, rank_layer, layer_list, image_token_ratio_list, image_tokens
                    )
        positions.append(seen)
        step_logits = model.lm_head(lm.norm(hidden_states))[:, -1].float()
        logits.append(step_logits)
        token = step_logits.index_fill(1, torch.tensor(suppress), -math.inf).argmax(dim=-1)  # greedy, suppressed ids
        generated.append(int(token))
        hidden_states = model.get_input_embeddings()(token[:, None])
        attention_mask = torch.cat([attention_mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
    return generated, torch.cat(logits), positions
