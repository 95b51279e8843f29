"""XLA reference of the decode step, op by op: split the fused projection, rope, the KV write
(``kv_write``'s reference), then decode attention over the paged pools
(``paged_decode_attention_reference``). Quantized pools go through the same ops (the write
quantizes, the attention reads them dequantized)."""
from __future__ import annotations

import jax

from .._dense import causal_window_mask, masked_attention, over_context
from ..kv_quant import gather_kv
from ..kv_write.reference import write_kv_reference
from ..rope import apply_rope


def split_qkv(qkv: jax.Array, kv_heads: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``[B, (heads + 2 * kv_heads) * head_dim]`` -> q ``[B, heads, head_dim]``, k and v
    ``[B, kv_heads, head_dim]``."""
    batch, width = qkv.shape
    heads = width // head_dim - 2 * kv_heads
    parts = qkv.reshape(batch, width // head_dim, head_dim)
    return parts[:, :heads], parts[:, heads:heads + kv_heads], parts[:, heads + kv_heads:]


def paged_decode_attention_reference(q, k_pages, v_pages, layer, block_tables, context_lens, scale,
                                     window=None, soft_cap=None):
    """Row ``b``'s single query, at position ``p = context_lens[b] - 1``, attends to cached
    positions ``0 .. p`` of layer ``layer`` of the stacked pools, only ``p - window < k`` of them
    with a ``window`` (int32 scalar, <= 0: none); ``soft_cap`` as ``_dense.masked_attention``. The
    pages gathered are the first blocks of the tables that hold the longest context
    (``_dense.over_context``)."""
    def attend(tables):
        k = gather_kv(k_pages, tables, layer, q.dtype)
        v = gather_kv(v_pages, tables, layer, q.dtype)
        mask = causal_window_mask((context_lens - 1)[:, None], k.shape[2], window)      # [B, 1, S]
        return masked_attention(q[:, None], k, v, mask, scale, soft_cap)[:, 0]
    return over_context(attend, block_tables, context_lens, k_pages.shape[-2])


def decode_step_attention_reference(qkv, cos, sin, k_pages, v_pages, layer, slots, block_tables, context_lens,
                                    scale, window=None, soft_cap=None):
    """Layer ``layer`` of the stacked pools; returns ``(out, k_pages, v_pages)``. ``window`` and
    ``soft_cap`` as ``paged_decode_attention_reference``."""
    q, k, v = split_qkv(qkv, k_pages.shape[1], k_pages.shape[-1])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_pages, v_pages = write_kv_reference(k_pages, v_pages, k, v, slots, layer)
    out = paged_decode_attention_reference(q, k_pages, v_pages, layer, block_tables, context_lens, scale,
                                           window, soft_cap)
    return out, k_pages, v_pages
