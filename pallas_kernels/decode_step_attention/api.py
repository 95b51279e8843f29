"""The decode step's attention the models call: the Pallas kernel on a GPU, the XLA reference
elsewhere, behind one function, so the models never change when an implementation does."""
from __future__ import annotations

import jax

from .._checks import (check_fused_qkv, check_int32, check_pages, check_paged_attention_inputs,
                       check_rope_tables, check_window_and_cap, choose_kernel, stacked, unstacked)
from .reference import decode_step_attention_reference


def decode_step_attention(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_pages: jax.Array,
                          v_pages: jax.Array, layer: jax.Array | int | None, slots: jax.Array,
                          block_tables: jax.Array, context_lens: jax.Array, scale: float, *,
                          sliding_window: int | jax.Array | None = None, logits_soft_cap: float | None = None,
                          impl: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode token per row: rope on its q and k, its K/V written at its slot, its q heads
    attending over the row's cache, itself included.

    qkv ``[B, (heads + 2 * kv_heads) * head_dim]``: the fused projection's output, q heads then k
    heads then v heads (one tensor-parallel shard's); cos, sin float32 ``[B, head_dim]`` at the
    token's position (rotate-half layout); pages ``[kv_heads, num_blocks, block_size, head_dim]``,
    or layer-stacked ``[layers, ...]`` with ``layer`` (int32 scalar) the one to use; slots int32
    ``[B]``; block_tables int32 ``[B, M]``; context_lens int32 ``[B]`` (this token included).
    Returns ``(out [B, heads, head_dim], k_pages, v_pages)``, the pools shaped as given. Rows with
    context_len 0 are padding: zeros out, their K/V written at their slot (block 0, which no
    sequence reads). ``scale`` multiplies ``q.k`` (``head_dim ** -0.5``, or Gemma's
    ``query_pre_attn_scalar ** -0.5``). ``sliding_window``: the token, at position
    ``context_len - 1 = p``, sees only keys ``p - sliding_window < k`` (None/0: all; an int32
    scalar may be traced, <= 0 then meaning none); ``logits_soft_cap``: scores
    ``cap * tanh(scores / cap)`` (see ``_checks.check_window_and_cap``).
    Quantized pools (``kv_quant.QuantizedPages``, K and V): the token's K/V are quantized as
    ``kv_write.api.write_kv`` does, and the attention reads every position dequantized to qkv's dtype,
    the new token's too (what a later step reads back). ``impl``: see ``pallas_kernels._dispatch``
    (default: the Pallas kernel on a GPU, which updates the pools in place when the caller's pools
    are dead afterwards).
    """
    kv_heads, _, _, head_dim = check_pages(k_pages, v_pages)
    batch = qkv.shape[0]
    heads = check_fused_qkv(qkv, k_pages)
    check_paged_attention_inputs(jax.ShapeDtypeStruct((batch, heads, head_dim), qkv.dtype), k_pages, v_pages,
                                 block_tables, context_lens, '[B, heads, head_dim]')
    check_rope_tables(cos, sin, batch, head_dim)
    check_int32('slots', slots, (batch,))
    window, soft_cap = check_window_and_cap(sliding_window, logits_soft_cap)
    single_layer = k_pages.ndim == 4
    k_pages, v_pages, layer = stacked(k_pages, v_pages, layer)
    # -- implementation choice: the Pallas GPU kernel, else the reference --
    from . import pallas_gpu
    chosen = choose_kernel(impl, pallas_gpu.unsupported(qkv, k_pages))
    if chosen != 'reference':
        out, k_pages, v_pages = pallas_gpu.decode_step_attention_pallas(
            qkv, cos, sin, k_pages, v_pages, layer, slots, block_tables, context_lens, float(scale), window,
            soft_cap, interpret=chosen == 'pallas_interpret')
    else:
        out, k_pages, v_pages = decode_step_attention_reference(
            qkv, cos, sin, k_pages, v_pages, layer, slots, block_tables, context_lens, scale, window, soft_cap)
    return (out, unstacked(k_pages), unstacked(v_pages)) if single_layer else (out, k_pages, v_pages)
