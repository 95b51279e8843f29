"""XLA reference of paged decode attention: gather every row's pages, then dense masked attention."""
from __future__ import annotations

import jax.numpy as jnp

from .._dense import gather_pages, masked_attention


def paged_decode_attention_reference(q, k_pages, v_pages, layer, block_tables, context_lens, scale):
    """Row ``b``'s single query attends to cached positions ``0 .. context_lens[b] - 1`` of layer
    ``layer`` of the stacked pools."""
    k = gather_pages(k_pages, block_tables, layer)
    v = gather_pages(v_pages, block_tables, layer)
    mask = jnp.arange(k.shape[2])[None, None, :] < context_lens[:, None, None]   # [B, 1, S]
    return masked_attention(q[:, None], k, v, mask, scale)[:, 0]
