"""XLA reference of paged prefill attention: gather every row's pages (the cached prefix and this
chunk, already written; a quantized pool's dequantized to q's dtype, ``kv_quant.gather_kv``), then
dense causal attention."""
from __future__ import annotations

import jax.numpy as jnp

from .._dense import causal_window_mask, masked_attention, over_context
from ..kv_quant import gather_kv


def paged_prefill_attention_reference(q, k_pages, v_pages, layer, block_tables, context_lens, query_lens,
                                      scale, window=None, soft_cap=None):
    """Layer ``layer`` of the stacked pools. Query token ``i < query_lens[b]`` of row ``b`` sits at position
    ``p = context_lens[b] - query_lens[b] + i`` and attends to every cached position up to its own,
    only ``p - window < k`` of them with a ``window`` (int32 scalar, <= 0: none); ``soft_cap`` as
    ``_dense.masked_attention``. The pages gathered are the first blocks of the tables that hold the
    longest context (``_dense.over_context``)."""
    tokens = jnp.arange(q.shape[1])
    q_pos = (context_lens - query_lens)[:, None] + tokens[None, :]                   # [B, T]
    valid = (tokens[None, :] < query_lens[:, None])[:, :, None]                   # [B, T, 1]

    def attend(tables):
        k = gather_kv(k_pages, tables, layer, q.dtype)
        v = gather_kv(v_pages, tables, layer, q.dtype)
        return masked_attention(q, k, v, causal_window_mask(q_pos, k.shape[2], window) & valid, scale, soft_cap)
    return over_context(attend, block_tables, context_lens, k_pages.shape[-2])
