"""XLA reference of paged prefill attention: gather every row's pages (the cached prefix and this
chunk, already written), then dense causal attention."""
from __future__ import annotations

import jax.numpy as jnp

from .._dense import gather_pages, masked_attention


def paged_prefill_attention_reference(q, k_pages, v_pages, layer, block_tables, context_lens, query_lens,
                                      scale):
    """Layer ``layer`` of the stacked pools. Query token ``i < query_lens[b]`` of row ``b`` sits at position
    ``context_lens[b] - query_lens[b] + i`` and attends to every cached position up to its own."""
    k = gather_pages(k_pages, block_tables, layer)
    v = gather_pages(v_pages, block_tables, layer)
    tokens = jnp.arange(q.shape[1])
    q_pos = (context_lens - query_lens)[:, None] + tokens[None, :]                   # [B, T]
    causal = jnp.arange(k.shape[2])[None, None, :] <= q_pos[:, :, None]            # [B, T, S]
    valid = (tokens[None, :] < query_lens[:, None])[:, :, None]                   # [B, T, 1]
    return masked_attention(q, k, v, causal & valid, scale)
