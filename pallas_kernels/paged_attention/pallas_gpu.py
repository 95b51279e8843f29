"""Paged decode attention as a Pallas kernel (Triton lowering), split over the sequence.

Why this shape of kernel: a decode step reads every cached K and V once and does ~1 FLOP per byte,
so the only aim is to stream the pages at the card's copy bandwidth. One program owns one
(row, kv_head, split): it loads its query group once, then walks the row's pages in tiles of
``tile_tokens`` positions with an online softmax. Each tile gathers its rows straight from the
pool (a page is ``block_size`` contiguous rows of ``head_dim``, so the loads are 16-byte and
coalesced) and stops at the row's length, so ragged batches move only the bytes they need.

Grouped-query heads share their KV head's pages: the ``group`` query heads of one KV head are the
rows of one matmul, padded to 16 (the smallest Triton ``dot``), so K and V are read once per KV
head, not once per query head. The padding costs tensor-core work, which is free here.

Flash-decoding: when ``batch * kv_heads`` programs would leave SMs idle (small batches), each row's
tiles are divided among ``num_splits`` programs; each writes an unnormalised partial output with
its running max and sum, and a second small Pallas kernel (``combine_splits``, one launch)
combines them. With one split the kernel writes the normalised output itself and no second pass
runs. The decode-step op (``decode_step_attention``) launches the same way, through the pieces
here.

A sliding window starts the row's tiles at the window's first position, so a long context costs
only its window's bytes; the splits share the window's tiles.

Quantized pools (``kv_quant.QuantizedPages``, 8 or 4 bits) take the same launch: each tile's codes
and per-position scale and zero point are loaded and dequantized in registers to q's dtype
(``_pallas_tiles.load_kv_tile``), so a step reads a half or a quarter of the bytes (plus 8 per
position and KV head) and no dequantized copy of the cache exists.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .._pallas_tiles import (MIN_DOT, Logits, attend_pages, attention_unsupported, group_heads, init_state,
                             layer_head, next_pow2, pool_rows, split_refs, split_tiles, store_split, tile_for,
                             window_input, window_of, window_start)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch knobs. ``tile_tokens``: KV positions per loop step for 16-bit inputs (a power of
    two >= 16; halved for float32);
    ``target_programs``: how many programs to aim for before splitting rows (None: twice the
    device's SM count); ``num_splits`` forces a split count (None: from ``target_programs``).

    ``num_stages``: the K/V loads sit behind the block-table load, and Triton (3.6) spreads the
    stages over that chain: 3 or 4 stages give one K/V buffer (the next tile is requested only
    after the current one is used), 5 give two (one tile in flight while one is used), 7 three.
    Seen by compiling for sm_90 offline: tile 64, 5 stages: 72 KB shared memory, 118 registers
    (three programs per SM).

    ``page_tiles``: a tile inside one page (``block_size`` a multiple of the tile) loads one page
    number, as a scalar, and its rows as one contiguous run, instead of gathering a page number
    per position (tiles that span pages still do). Off until swept on a GPU
    (``bench_kernels.py --sweep``)."""
    tile_tokens: int = 64
    num_warps: int = 4
    num_stages: int = 5
    target_programs: int | None = None
    num_splits: int | None = None
    page_tiles: bool = False


def unsupported(q, k_pages) -> str | None:
    """Why this kernel cannot take these inputs, or None (``attention_unsupported``)."""
    return attention_unsupported(q.dtype, k_pages.shape[-1])


def _sm_count() -> int:
    return getattr(jax.devices()[0], 'core_count', None) or 132


def choose_num_splits(batch: int, kv_heads: int, max_tiles: int, config: DecodeConfig) -> int:
    """Programs per (row, kv_head): enough that ``batch * kv_heads * splits`` reaches the target,
    never more than a full-length row has tiles."""
    if config.num_splits is not None:
        return max(1, min(config.num_splits, max_tiles))
    target = config.target_programs or 2 * _sm_count()
    return max(1, min(max_tiles, -(-target // (batch * kv_heads))))


def plan_splits(batch: int, kv_heads: int, block_tables, block_size: int, dtype, head_dim: int,
                config: DecodeConfig) -> tuple[int, int]:
    """``(tile, num_splits)`` of a decode launch: KV positions per tile for ``dtype`` and
    ``head_dim``, and the programs per (row, kv_head)."""
    tile = tile_for(config.tile_tokens, dtype, head_dim)
    max_tiles = pl.cdiv(block_tables.shape[1] * block_size, tile)
    return tile, choose_num_splits(batch, kv_heads, max_tiles, config)


def group_pad(group: int) -> int:
    """Matmul rows for a KV head's ``group`` query heads: a power of two, at least ``MIN_DOT``."""
    return max(MIN_DOT, next_pow2(group))


def split_out_shapes(batch: int, num_splits: int, num_heads: int, head_dim: int, dtype):
    """The decode kernels' outputs (``store_split``): the output itself for one split, else the
    float32 partials and their running max and sum."""
    if num_splits == 1:
        return [jax.ShapeDtypeStruct((batch, num_heads, head_dim), dtype)]
    return [jax.ShapeDtypeStruct((batch, num_splits, num_heads, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_splits, num_heads), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_splits, num_heads), jnp.float32)]


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


def _combine_kernel(o_ref, m_ref, l_ref, out_ref, *, num_splits):
    """One (row b, query head j): weigh each split's partial by ``exp2(its max - the max)``; an
    empty split (max -inf, sum 0) weighs 0, a row whose splits are all empty gives zeros."""
    b, j = pl.program_id(0), pl.program_id(1)
    split = jnp.arange(next_pow2(num_splits))
    real = split < num_splits
    cols = jnp.arange(o_ref.shape[-1])[None, :]
    m = plgpu.load(m_ref.at[b, split, j], mask=real, other=-jnp.inf)
    l = plgpu.load(l_ref.at[b, split, j], mask=real, other=0.0)
    o = plgpu.load(o_ref.at[b, split[:, None], j, cols], mask=real[:, None], other=0.0)
    m_max = m.max()
    w = jnp.exp2(m - jnp.where(m_max > -jnp.inf, m_max, 0.0))
    total = (w * l).sum()
    out = (w[:, None] * o).sum(axis=0) / jnp.where(total > 0, total, 1.0)
    plgpu.store(out_ref.at[b, j, cols[0]], out.astype(out_ref.dtype))


def combine_splits(o, m, l, dtype, interpret: bool = False):
    """Merge per-split partials ``o [B, S, H, d]``, ``m``/``l [B, S, H]`` (log2 domain) into
    ``[B, H, d]`` of ``dtype``, in one launch (the XLA formula took four kernels); rows with no
    cached positions (every split empty) give zeros."""
    batch, num_splits, num_heads, head_dim = o.shape
    return pl.pallas_call(
        functools.partial(_combine_kernel, num_splits=num_splits),
        grid=(batch, num_heads),
        out_shape=jax.ShapeDtypeStruct((batch, num_heads, head_dim), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=2, num_stages=1),
        interpret=interpret,
        name='combine_splits',
    )(o, m, l)


def finish_splits(outs, dtype, interpret: bool):
    """The attention output from a decode kernel's outputs (``split_out_shapes``)."""
    return outs[0] if len(outs) == 1 else combine_splits(*outs, dtype, interpret)


@functools.partial(jax.jit, static_argnames=('scale', 'soft_cap', 'config', 'interpret'))
def paged_decode_attention_pallas(q, k_pages, v_pages, layer, block_tables, context_lens, scale: float,
                                  window=None, soft_cap: float | None = None,
                                  config: DecodeConfig = DecodeConfig(), interpret: bool = False):
    """Same contract as ``api.paged_decode_attention`` (inputs already validated there; pools
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
