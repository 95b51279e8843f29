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
its running max and sum, and a small XLA reduction combines them. With one split the kernel writes
the normalised output itself and no second pass runs.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .._pallas_tiles import (LOG2E, MIN_DOT, init_state, load_kv_tile, next_pow2, normalise,
                             pool_rows, softmax_step, tile_for, triton_supports)


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
    (three programs per SM)."""
    tile_tokens: int = 64
    num_warps: int = 4
    num_stages: int = 5
    target_programs: int | None = None
    num_splits: int | None = None


def supports(q, k_pages) -> bool:
    """Shapes and dtypes this kernel handles (Triton needs power-of-two tile extents)."""
    return triton_supports(q.dtype, k_pages.shape[-1])


def _sm_count() -> int:
    return getattr(jax.devices()[0], 'core_count', None) or 132


def choose_num_splits(batch: int, kv_heads: int, max_tiles: int, config: DecodeConfig) -> int:
    """Programs per (row, kv_head): enough that ``batch * kv_heads * splits`` reaches the target,
    never more than a full-length row has tiles."""
    if config.num_splits is not None:
        return max(1, min(config.num_splits, max_tiles))
    target = config.target_programs or 2 * _sm_count()
    return max(1, min(max_tiles, -(-target // (batch * kv_heads))))


def _decode_kernel(base_ref, lens_ref, tables_ref, q_ref, k_ref, v_ref, *out_refs, group, group_pad,
                   block_size, tile, num_splits, scale_log2):
    """One (row b, kv head h, split s): the split's share of the row's tiles. The pools' rows
    are (layer, kv head) pairs; ``base_ref[0]`` is the layer's first."""
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pool_head = base_ref[0] + h
    length = jnp.minimum(lens_ref[b], tables_ref.shape[1] * block_size)
    n_tiles = pl.cdiv(length, tile)
    per_split = pl.cdiv(n_tiles, num_splits)
    first = s * per_split
    last = jnp.minimum(first + per_split, n_tiles)

    lane = jnp.arange(group_pad)
    heads = (h * group + lane)[:, None]                       # query heads of this KV head
    head_ok = (lane < group)[:, None]
    cols = jnp.arange(q_ref.shape[-1])[None, :]
    q = plgpu.load(q_ref.at[b, heads, cols], mask=head_ok, other=0)

    def body(t, state):
        pos = t * tile + jnp.arange(tile)
        valid = pos < length
        k, v = load_kv_tile(tables_ref, k_ref, v_ref, b, pool_head, pos, valid, block_size)
        return softmax_step(state, q, k, v, valid[None, :], scale_log2)

    acc, m, l = lax.fori_loop(first, last, body, init_state(group_pad, q.shape[-1]))
    if num_splits == 1:
        (o_ref,) = out_refs
        plgpu.store(o_ref.at[b, heads, cols], normalise(acc, l).astype(o_ref.dtype), mask=head_ok)
    else:
        o_ref, m_ref, l_ref = out_refs
        plgpu.store(o_ref.at[b, s, heads, cols], acc, mask=head_ok)
        plgpu.store(m_ref.at[b, s, heads[:, 0]], m, mask=head_ok[:, 0])
        plgpu.store(l_ref.at[b, s, heads[:, 0]], l, mask=head_ok[:, 0])


def combine_splits(o, m, l, dtype):
    """Merge per-split partials ``o [B, S, H, d]``, ``m``/``l [B, S, H]`` (log2 domain) into
    ``[B, H, d]``; rows with no cached positions (every split empty) give zeros."""
    m_max = m.max(axis=1, keepdims=True)
    w = jnp.exp2(m - jnp.where(jnp.isfinite(m_max), m_max, 0.0))       # empty split: weight 0
    total = (w * l).sum(axis=1)
    out = (w[..., None] * o).sum(axis=1) / jnp.where(total > 0, total, 1.0)[..., None]
    return out.astype(dtype)


@functools.partial(jax.jit, static_argnames=('scale', 'config', 'interpret'))
def paged_decode_attention_pallas(q, k_pages, v_pages, layer, block_tables, context_lens, scale: float,
                                  config: DecodeConfig = DecodeConfig(), interpret: bool = False):
    """Same contract as ``api.paged_decode_attention`` (inputs already validated there; pools
    layer-stacked)."""
    batch, num_heads, head_dim = q.shape
    layers, kv_heads, num_blocks, block_size, _ = k_pages.shape
    group = num_heads // kv_heads
    tile = tile_for(config.tile_tokens, q.dtype)
    max_tiles = pl.cdiv(block_tables.shape[1] * block_size, tile)
    num_splits = choose_num_splits(batch, kv_heads, max_tiles, config)

    k_rows, v_rows, base = pool_rows(k_pages, v_pages, layer)
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((batch, num_heads, head_dim), q.dtype)]
    else:
        out_shape = [jax.ShapeDtypeStruct((batch, num_splits, num_heads, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((batch, num_splits, num_heads), jnp.float32),
                     jax.ShapeDtypeStruct((batch, num_splits, num_heads), jnp.float32)]
    kernel = functools.partial(
        _decode_kernel, group=group, group_pad=max(MIN_DOT, next_pow2(group)),
        block_size=block_size, tile=tile, num_splits=num_splits, scale_log2=scale * LOG2E)
    outs = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name='paged_decode_attention',
    )(base, context_lens, block_tables, q, k_rows, v_rows)
    if num_splits == 1:
        return outs[0]
    return combine_splits(*outs, q.dtype)
