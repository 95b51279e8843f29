"""The prefill attention the models call: the Pallas kernel on a GPU, the XLA reference elsewhere,
behind one function, so the models never change when an implementation does."""
from __future__ import annotations

import jax

from .._checks import check_int32, check_paged_attention_inputs, check_window_and_cap, choose_kernel, stacked
from .reference import paged_prefill_attention_reference


def paged_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                            block_tables: jax.Array, context_lens: jax.Array, query_lens: jax.Array,
                            scale: float, layer: jax.Array | int | None = None, *,
                            sliding_window: int | jax.Array | None = None, logits_soft_cap: float | None = None,
                            impl: str | None = None) -> jax.Array:
    """A chunk of query tokens per row over its cached prefix plus itself (causal).

    q ``[B, T, heads, head_dim]``, left-aligned; pages ``[kv_heads, num_blocks, block_size, head_dim]``
    (or layer-stacked ``[layers, ...]`` with ``layer``, as in the decode op) already holding this
    chunk's K/V; block_tables int32 ``[B, M]``; context_lens int32 ``[B]``
    (cached tokens including the chunk); query_lens int32 ``[B]`` (valid tokens of the row).
    Returns ``[B, T, heads, head_dim]``; padding tokens are zeros. Softmax in float32.
    ``scale``, ``sliding_window`` and ``logits_soft_cap`` as
    ``decode_step_attention.api.decode_step_attention``: query token ``i`` sits at position
    ``p = context_len - query_len + i`` and sees keys ``p - sliding_window < k <= p``.
    ``impl``: see ``pallas_kernels._dispatch`` (default: the Pallas kernel on a GPU).
    """
    check_paged_attention_inputs(q, k_pages, v_pages, block_tables, context_lens, '[B, T, heads, head_dim]')
    check_int32('query_lens', query_lens, (q.shape[0],))
    window, soft_cap = check_window_and_cap(sliding_window, logits_soft_cap)
    k_pages, v_pages, layer = stacked(k_pages, v_pages, layer)
    # -- implementation choice: the Pallas GPU kernel, else the reference --
    from . import pallas_gpu
    chosen = choose_kernel(impl, pallas_gpu.unsupported(q, k_pages))
    if chosen != 'reference':
        return pallas_gpu.paged_prefill_attention_pallas(
            q, k_pages, v_pages, layer, block_tables, context_lens, query_lens, float(scale), window, soft_cap,
            interpret=chosen == 'pallas_interpret')
    return paged_prefill_attention_reference(q, k_pages, v_pages, layer, block_tables, context_lens,
                                             query_lens, scale, window, soft_cap)
