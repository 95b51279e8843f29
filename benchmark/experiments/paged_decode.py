"""Paged decode attention alone (q already roped, the step's K/V already in the cache) as a Pallas
kernel, with its XLA reference behind one op: the attention that ``decode_step_attention`` (the op
the models call) fuses with rope and the KV write, kept to benchmark the attention on its own and
as the baseline of the other decode kernels here (``bench_kernels.py --ops decode``).

One program owns one (row, kv_head, split): it loads its query group once, then walks the row's
pages in tiles of ``tile_tokens`` positions with an online softmax, gathering each tile's rows
straight from the pool and stopping at the row's length; the splits, tiles and combine are the
models' (``pallas_kernels._flash_decoding``, ``pallas_kernels._pallas_tiles``). A sliding window
starts the row's tiles at the window's first position. Quantized pools
(``kv_quant.QuantizedPages``) are dequantized tile by tile in registers.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._checks import check_paged_attention_inputs, check_window_and_cap, choose_kernel, stacked
from pallas_kernels._flash_decoding import DecodeConfig, finish_splits, group_pad, plan_splits, split_out_shapes
from pallas_kernels._pallas_tiles import (Logits, attend_pages, attention_unsupported, group_heads, init_state,
                                          layer_head, pool_rows, split_refs, split_tiles, store_split, window_input,
                                          window_of, window_start)
from pallas_kernels.decode_step_attention.reference import paged_decode_attention_reference

__all__ = ['DecodeConfig', 'paged_decode_attention', 'paged_decode_attention_pallas']


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
    chosen = choose_kernel(impl, unsupported(q, k_pages))
    if chosen != 'reference':
        return paged_decode_attention_pallas(
            q, k_pages, v_pages, layer, block_tables, context_lens, float(scale), window, soft_cap,
            interpret=chosen == 'pallas_interpret')
    return paged_decode_attention_reference(q, k_pages, v_pages, layer, block_tables, context_lens, scale,
                                            window, soft_cap)


def unsupported(q, k_pages) -> str | None:
    """Why this kernel cannot take these inputs, or None (``attention_unsupported``)."""
    return attention_unsupported(q.dtype, k_pages.shape[-1])


def _decode_kernel(layer_ref, lens_ref, tables_ref, q_ref, k_ref, v_ref, *refs, windowed, kv_heads, group,
                   group_pad, block_size, tile, num_splits, logits, page_tiles):
    """One (row b, kv head h, split s) of layer ``layer_ref[0]``: the split's share of the tiles
    of the row's positions in its query's window."""
    window_ref, out_refs = split_refs(refs, windowed)
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = jnp.minimum(lens_ref[b], tables_ref.shape[1] * block_size)
    span = (window_start(window_of(window_ref), length - 1), length)
    heads, head_ok = group_heads(h, group, group_pad)
    cols = jnp.arange(q_ref.shape[-1])[None, :]
    q = plgpu.load(q_ref.at[b, heads, cols], mask=head_ok, other=0)
    state = attend_pages(init_state(group_pad, q.shape[-1]), q, tables_ref, k_ref, v_ref, b,
                         layer_head(layer_ref, kv_heads, h), span, split_tiles(s, span, tile, num_splits),
                         block_size, tile, logits, page_tiles)
    store_split(out_refs, state, b, s, heads, cols, head_ok)


@functools.partial(jax.jit, static_argnames=('scale', 'soft_cap', 'config', 'interpret'))
def paged_decode_attention_pallas(q, k_pages, v_pages, layer, block_tables, context_lens, scale: float,
                                  window=None, soft_cap: float | None = None,
                                  config: DecodeConfig = DecodeConfig(), interpret: bool = False):
    """Same contract as ``paged_decode_attention`` (inputs already validated there; pools
    layer-stacked; ``window`` an int32 scalar or None, ``soft_cap`` a float or None)."""
    batch, num_heads, head_dim = q.shape
    layers, kv_heads, num_blocks, block_size, _ = k_pages.shape
    group = num_heads // kv_heads
    tile, num_splits = plan_splits(batch, kv_heads, block_tables, block_size, q.dtype, head_dim, config)
    k_rows, v_rows, layer = pool_rows(k_pages, v_pages, layer)
    kernel = functools.partial(
        _decode_kernel, windowed=window is not None, kv_heads=kv_heads, group=group, group_pad=group_pad(group),
        block_size=block_size, tile=tile, num_splits=num_splits, logits=Logits(scale, soft_cap),
        page_tiles=config.page_tiles)
    outs = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_splits),
        out_shape=split_out_shapes(batch, num_splits, num_heads, head_dim, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name='paged_decode_attention',
    )(layer, context_lens, block_tables, q, k_rows, v_rows, *window_input(window))
    return finish_splits(outs, q.dtype, interpret)
