"""XLA reference of paged decode attention: gather every row's pages (a quantized pool's dequantized
to q's dtype, ``kv_quant.gather_kv``), then dense masked attention."""
from __future__ import annotations

from .._dense import causal_window_mask, masked_attention
from ..kv_quant import gather_kv


def paged_decode_attention_reference(q, k_pages, v_pages, layer, block_tables, context_lens, scale,
                                     window=None, soft_cap=None):
    """Row ``b``'s single query, at position ``p = context_lens[b] - 1``, attends to cached
    positions ``0 .. p`` of layer ``layer`` of the stacked pools, only ``p - window < k`` of them
    with a ``window`` (int32 scalar, <= 0: none); ``soft_cap`` as ``_dense.masked_attention``."""
    k = gather_kv(k_pages, block_tables, layer, q.dtype)
    v = gather_kv(v_pages, block_tables, layer, q.dtype)
    mask = causal_window_mask((context_lens - 1)[:, None], k.shape[2], window)      # [B, 1, S]
    return masked_attention(q[:, None], k, v, mask, scale, soft_cap)[:, 0]
