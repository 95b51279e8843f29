"""XLA reference of the decode step: the model's own path, op by op (split the fused projection,
rope, KV write, decode attention), so on a CPU the step computes exactly what it did before the op
existed. Quantized pools go through the same ops (the write quantizes, the attention reads them
dequantized)."""
from __future__ import annotations

import jax

from ..kv_write.reference import write_kv_reference
from ..paged_attention.reference import paged_decode_attention_reference
from ..rope import apply_rope


def split_qkv(qkv: jax.Array, kv_heads: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``[B, (heads + 2 * kv_heads) * head_dim]`` -> q ``[B, heads, head_dim]``, k and v
    ``[B, kv_heads, head_dim]``."""
    batch, width = qkv.shape
    heads = width // head_dim - 2 * kv_heads
    parts = qkv.reshape(batch, width // head_dim, head_dim)
    return parts[:, :heads], parts[:, heads:heads + kv_heads], parts[:, heads + kv_heads:]


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
