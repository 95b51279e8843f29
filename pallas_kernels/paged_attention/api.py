"""Decode attention alone (q already roped, the step's K/V already in the cache): the Pallas kernel
on a GPU, the XLA reference elsewhere. The models call ``decode_step_attention``, which fuses rope
and the KV write before the same kernel; this op checks and benchmarks the kernel on its own."""
from __future__ import annotations

import jax

from .._checks import check_paged_attention_inputs, check_window_and_cap, choose_kernel, stacked
from .reference import paged_decode_attention_reference


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           block_tables: jax.Array, context_lens: jax.Array, scale: float,
                           layer: jax.Array | int | None = None, *, sliding_window: int | jax.Array | None = None,
                           logits_soft_cap: float | None = None, impl: str | None = None) -> jax.Array:
    """One query token per row over its paged cache.

    q ``[B, heads, head_dim]``; pages ``[kv_heads, num_blocks, block_size, head_dim]``, or every
    layer's stacked ``[layers, kv_heads, ...]`` with ``layer`` (int32 scalar) the one to read;
    block_tables int32 ``[B, M]``; context_lens int32 ``[B]`` (cached tokens, this step's
    included). Returns ``[B, heads, head_dim]``; rows with context_len 0 are zeros. ``scale``
    multiplies ``q.k`` (``head_dim ** -0.5``, or Gemma's ``query_pre_attn_scalar ** -0.5``).
    ``sliding_window``: the query, at position ``context_len - 1 = p``, sees only keys
    ``p - sliding_window < k`` (None/0: all; an int32 scalar may be traced, <= 0 then meaning
    none); ``logits_soft_cap``: scores ``cap * tanh(scores / cap)`` (see
    ``_checks.check_window_and_cap``). ``impl``: see ``pallas_kernels._dispatch`` (default: the
    Pallas kernel on a GPU).
    """
    check_paged_attention_inputs(q, k_pages, v_pages, block_tables, context_lens, '[B, heads, head_dim]')
    window, soft_cap = check_window_and_cap(sliding_window, logits_soft_cap)
    k_pages, v_pages, layer = stacked(k_pages, v_pages, layer)
    # -- implementation choice: the Pallas GPU kernel, else the reference --
    from . import pallas_gpu
    chosen = choose_kernel(impl, pallas_gpu.unsupported(q, k_pages))
    if chosen != 'reference':
        return pallas_gpu.paged_decode_attention_pallas(
            q, k_pages, v_pages, layer, block_tables, context_lens, float(scale), window, soft_cap,
            interpret=chosen == 'pallas_interpret')
    return paged_decode_attention_reference(q, k_pages, v_pages, layer, block_tables, context_lens, scale,
                                            window, soft_cap)
