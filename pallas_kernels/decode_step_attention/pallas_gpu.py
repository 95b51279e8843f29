"""The decode step's attention as one Pallas kernel (Triton lowering): rope, KV write and paged
decode attention of one new token per row.

Why one kernel: at batch 1 a decode step is launch-bound, and per layer XLA runs rope on q, rope on
k, a copy slicing v out of the fused projection, the KV write and the attention as five launches
(plus the split combine). Here the kernel reads the fused projection ``qkv`` itself: the program
of (row b, KV head h, split s) loads its GQA group of q heads rotated in registers
(``load_rotated``), and attends over the row's cached positions tile by tile with an online softmax
(``_pallas_tiles.attend_pages``), split over the sequence as ``_flash_decoding`` plans it.

The new token never goes through the pool on its way to the attention: split 0 of each (row, KV
head) loads its k (rotated) and v, stores them at the row's slot (the pools are aliased to the
outputs, updated in place as the KV write kernel does), and starts its online softmax from the
token's own score. Every split reads only positions ``< context_len - 1``, so no program reads the
slot being written and no ordering between programs is needed. Padding rows (context_len 0) still
write at their slot (block 0, which no sequence reads) and attend to nothing (zeros). A sliding
window starts the cached positions read at the window's first (the new token is always inside).

Quantized pools (``kv_quant.QuantizedPages``): split 0 quantizes the new token's k and v in
registers before storing them (``_pallas_tiles.store_quantized``) and starts its softmax from their
dequantized values, exactly what later steps read back; the cached tiles are dequantized as they
are loaded (``_pallas_tiles.load_kv_tile``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .._pallas_tiles import (Logits, attend_pages, attention_unsupported, group_heads, init_state, layer_head,
                             load_rotated, pool_aliases, pool_outputs, pool_rows, pool_stacks, split_refs, split_tiles,
                             store_quantized, store_split, window_input, window_of, window_start)
from ..kv_quant import is_quantized
from .._flash_decoding import DecodeConfig, finish_splits, group_pad, plan_splits, split_out_shapes


def unsupported(qkv, k_pages) -> str | None:
    """Why this kernel cannot take these inputs, or None (``attention_unsupported``)."""
    return attention_unsupported(qkv.dtype, k_pages.shape[-1])


def _new_token_state(q, k_new, v_new, present, logits: Logits):
    """The online-softmax state of the new token alone (max = its score, sum = 1, acc = its v),
    or the empty state where it is not ``present``. ``q [rows, d]``, ``k_new``/``v_new [1, d]``."""
    score = logits.log2((q.astype(jnp.float32) * k_new.astype(jnp.float32)).sum(axis=1))
    empty_acc, empty_m, empty_l = init_state(*q.shape)
    acc = jnp.where(present, jnp.broadcast_to(v_new.astype(jnp.float32), empty_acc.shape), empty_acc)
    return acc, jnp.where(present, score, empty_m), jnp.where(present, 1.0, empty_l)


def _step_kernel(layer_ref, lens_ref, tables_ref, slots_ref, cos_ref, sin_ref, qkv_ref, k_in, v_in,
                 *refs, windowed, kv_heads, group, group_pad, block_size, tile, num_splits, logits, page_tiles):
    """One (row b, kv head h, split s) of layer ``layer_ref[0]``. ``qkv_ref`` is ``[B, heads +
    2 * kv_heads, head_dim]``. The pools are read through ``k_in``/``v_in`` and written through
    ``k_ref``/``v_ref`` (the first two outputs): the same buffers, and no position read is
    written."""
    window_ref, (k_ref, v_ref, *out_refs) = split_refs(refs, windowed)
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_heads = kv_heads * group
    pool_head = layer_head(layer_ref, kv_heads, h)
    length = jnp.minimum(lens_ref[b], tables_ref.shape[1] * block_size)
    cached = jnp.maximum(length - 1, 0)                     # positions before the new token
    span = (window_start(window_of(window_ref), length - 1), cached)
    cols = jnp.arange(qkv_ref.shape[-1])[None, :]
    cos = plgpu.load(cos_ref.at[b, cols]).astype(qkv_ref.dtype)
    sin = plgpu.load(sin_ref.at[b, cols]).astype(qkv_ref.dtype)
    heads, head_ok = group_heads(h, group, group_pad)
    q = load_rotated(qkv_ref, b, heads, cols, cos, sin, head_ok)

    owner = jnp.broadcast_to(s == 0, cols.shape)             # split 0 handles the new token
    k_new = load_rotated(qkv_ref, b, num_heads + h, cols, cos, sin, owner)
    v_new = plgpu.load(qkv_ref.at[b, num_heads + kv_heads + h, cols], mask=owner, other=0)
    slot = slots_ref[b]
    if is_quantized(k_ref):
        # Stored quantized; the token attends to itself as later steps will read it back.
        slot_row, owner_row = jnp.full((1, 1), slot), jnp.full((1, 1), s == 0)
        k_new = store_quantized(k_ref, pool_head, slot_row, k_new, owner_row)
        v_new = store_quantized(v_ref, pool_head, slot_row, v_new, owner_row)
    else:
        plgpu.store(k_ref.at[pool_head, slot, cols], k_new, mask=owner)
        plgpu.store(v_ref.at[pool_head, slot, cols], v_new, mask=owner)

    state = _new_token_state(q, k_new, v_new, (s == 0) & (length > 0), logits)
    state = attend_pages(state, q, tables_ref, k_in, v_in, b, pool_head, span, split_tiles(s, span, tile, num_splits),
                         block_size, tile, logits, page_tiles)
    store_split(out_refs, state, b, s, heads, cols, head_ok)


@functools.partial(jax.jit, static_argnames=('scale', 'soft_cap', 'config', 'interpret'))
def decode_step_attention_pallas(qkv, cos, sin, k_pages, v_pages, layer, slots, block_tables, context_lens,
                                 scale: float, window=None, soft_cap: float | None = None,
                                 config: DecodeConfig = DecodeConfig(), interpret: bool = False):
    """Same contract as ``api.decode_step_attention`` (inputs already validated there; pools
    layer-stacked; ``window`` an int32 scalar or None, ``soft_cap`` a float or None); returns
    ``(out, k_pages, v_pages)``."""
    batch, width = qkv.shape
    _, kv_heads, _, block_size, head_dim = k_pages.shape
    num_heads = width // head_dim - 2 * kv_heads
    group = num_heads // kv_heads
    tile, num_splits = plan_splits(batch, kv_heads, block_tables, block_size, qkv.dtype, head_dim, config)
    k_rows, v_rows, layer = pool_rows(k_pages, v_pages, layer)
    kernel = functools.partial(
        _step_kernel, windowed=window is not None, kv_heads=kv_heads, group=group, group_pad=group_pad(group),
        block_size=block_size, tile=tile, num_splits=num_splits, logits=Logits(scale, soft_cap),
        page_tiles=config.page_tiles)
    k_rows, v_rows, *outs = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_splits),
        out_shape=[*pool_outputs(k_rows, v_rows),
                   *split_out_shapes(batch, num_splits, num_heads, head_dim, qkv.dtype)],
        input_output_aliases=pool_aliases(7, k_rows, v_rows),     # k_rows, v_rows -> the first outputs
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name='decode_step_attention',
    )(layer, context_lens, block_tables, slots, cos, sin, qkv.reshape(batch, -1, head_dim), k_rows, v_rows,
      *window_input(window))
    out = finish_splits(outs, qkv.dtype, interpret)
    return out, pool_stacks(k_rows, k_pages), pool_stacks(v_rows, v_pages)
