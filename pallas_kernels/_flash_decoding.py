"""The flash-decoding launch the decode kernels share: how many programs split each row's
sequence (``DecodeConfig``, ``plan_splits``), the outputs a split writes (``split_out_shapes``), and
the Pallas kernel that merges the splits' partials (``combine_splits``).

One program owns one (row, kv_head, split) and walks its share of the row's tiles with an online
softmax (``_pallas_tiles.attend_pages``). When ``batch * kv_heads`` programs would leave SMs idle
(small batches), each row's tiles are divided among ``num_splits`` programs; each writes an
unnormalised partial output with its running max and sum, and ``combine_splits`` merges them in one
launch. With one split the kernel writes the normalised output itself and no second pass runs.
Grouped-query heads share their KV head's pages: the ``group`` query heads of one KV head are the
rows of one matmul, padded to 16 (``group_pad``), so K and V are read once per KV head.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ._pallas_tiles import MIN_DOT, next_pow2, tile_for


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch knobs of a decode kernel.

    ``tile_tokens``: KV positions per loop step for 16-bit inputs (a power of two >= 16; halved
    for float32). ``num_warps``, ``num_stages``: Triton's (the K/V loads sit behind the
    block-table load, and Triton spreads the stages over that chain: 3 or 4 stages give one K/V
    buffer, 5 give two, 7 three). ``target_programs``: how many programs to aim for before
    splitting rows (None: twice the device's SM count); ``num_splits`` forces a split count (None:
    from ``target_programs``). ``page_tiles``: a tile inside one page (``block_size`` a multiple
    of the tile) loads one page number, as a scalar, and its rows as one contiguous run, instead
    of a page number per position (tiles that span pages still do); off by default
    (``bench_kernels.py --sweep`` compares both)."""
    tile_tokens: int = 64
    num_warps: int = 4
    num_stages: int = 5
    target_programs: int | None = None
    num_splits: int | None = None
    page_tiles: bool = False


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
    ``[B, H, d]`` of ``dtype``, in one launch (XLA computes the same formula in four); rows with no
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
