"""Paged decode attention as a hand-written Triton kernel launched through ``jax_triton``: a
benchmark alternative to ``paged_decode.py``'s Pallas kernel (same contract as
``paged_decode_attention_pallas``, without its sliding window and soft cap).

Same algorithm as the Pallas kernel (one program per (row, kv_head, split); the query group padded
to a 16-row ``tl.dot``; an online softmax in the log2 domain over tiles of positions; flash-decoding
partials merged by ``_flash_decoding.combine_splits``), written directly in Triton so that what Pallas
hides can differ: a tile inside one page (``tile <= block_size``) reads its page number once, as a
scalar, and its K and V rows as one contiguous block; pool offsets are 64-bit (a stack of every
layer's pages passes 2**31 elements); the loop is pipelined by Triton's own ``num_stages``.

``triton`` and ``jax_triton`` are optional (not project dependencies): they are imported on first
use, and the kernel is a plain function until then, made a ``triton.jit`` kernel by
``triton_kernel`` (its annotations stay strings, so ``tl`` is bound only then).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels._pallas_tiles import LOG2E, tile_for
from pallas_kernels._flash_decoding import choose_num_splits, finish_splits, group_pad, split_out_shapes

tl = None      # triton.language, bound by ``triton_kernel`` (triton is imported lazily)
INSTALL_HINT = ('the jax_triton decode kernel needs triton and jax_triton: pip install --no-deps '
                '.whl/jax_triton-0.3.1-py3-none-any.whl (triton comes with the CUDA jaxlib image)')


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Launch knobs, as ``_flash_decoding.DecodeConfig``: ``tile_tokens`` positions per loop step (16-bit
    inputs; halved for float32), Triton's ``num_warps`` / ``num_stages``, the split target."""
    tile_tokens: int = 64
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int | None = None
    num_splits: int | None = None


def _decode_kernel(layer_ptr, lens_ptr, tables_ptr, q_ptr, k_ptr, v_ptr, o_ptr, m_ptr, l_ptr,
                   KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, MAX_PAGES: tl.constexpr,
                   POOL_ROW: tl.constexpr, TILE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   SCALE_LOG2: tl.constexpr, EXACT: tl.constexpr):
    """One (row b, kv head h, split s): its share of the row's tiles, then its output: with one
    split the output (``m_ptr``/``l_ptr`` unused), else the partial, its max and its sum."""
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.minimum(tl.load(lens_ptr + b), MAX_PAGES * BLOCK_SIZE)
    n_tiles = tl.cdiv(length, TILE)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    first = s * per_split
    last = tl.minimum(first + per_split, n_tiles)
    pool = (tl.load(layer_ptr) * KV_HEADS + h).to(tl.int64) * POOL_ROW
    lane = tl.arange(0, GROUP_PAD)
    heads = h * GROUP + lane
    head_ok = lane < GROUP
    cols = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (b * KV_HEADS * GROUP + heads)[:, None] * HEAD_DIM + cols[None, :],
                mask=head_ok[:, None], other=0.0)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    m = tl.full((GROUP_PAD,), float('-inf'), dtype=tl.float32)
    l = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    offs = tl.arange(0, TILE)
    for t in range(first, last):
        pos = t * TILE + offs
        valid = pos < length
        if TILE <= BLOCK_SIZE:       # the tile is inside one page: one page number, contiguous rows
            page = tl.load(tables_ptr + b * MAX_PAGES + t * TILE // BLOCK_SIZE).to(tl.int64)
            rows = page * BLOCK_SIZE + (t * TILE) % BLOCK_SIZE + offs
        else:
            page = tl.load(tables_ptr + b * MAX_PAGES + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            rows = page * BLOCK_SIZE + pos % BLOCK_SIZE
        at = pool + rows[:, None] * HEAD_DIM + cols[None, :]
        k = tl.load(k_ptr + at, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + at, mask=valid[:, None], other=0.0)
        if EXACT:
            scores = tl.dot(q, tl.trans(k), input_precision='ieee')
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(valid[None, :], scores * SCALE_LOG2, float('-inf'))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if EXACT:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision='ieee')
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    if NUM_SPLITS == 1:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(o_ptr + (b * KV_HEADS * GROUP + heads)[:, None] * HEAD_DIM + cols[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=head_ok[:, None])
    else:
        at = (b * NUM_SPLITS + s) * KV_HEADS * GROUP + heads
        tl.store(o_ptr + at[:, None] * HEAD_DIM + cols[None, :], acc, mask=head_ok[:, None])
        tl.store(m_ptr + at, m, mask=head_ok)
        tl.store(l_ptr + at, l, mask=head_ok)


@functools.cache
def triton_kernel():
    """The kernel as a ``triton.jit`` function (imports triton, binds ``tl``)."""
    global tl
    try:
        import triton
        import triton.language
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    tl = triton.language
    return triton.jit(_decode_kernel)


def kernel_constants(q, k_pages, block_tables, scale: float, config: TritonConfig) -> dict:
    """The kernel's constexpr arguments for these inputs (``NUM_SPLITS`` included)."""
    batch, num_heads, head_dim = q.shape
    _, kv_heads, num_blocks, block_size, _ = k_pages.shape
    tile = tile_for(config.tile_tokens, q.dtype, head_dim)
    max_pages = block_tables.shape[1]
    return dict(KV_HEADS=kv_heads, GROUP=num_heads // kv_heads, GROUP_PAD=group_pad(num_heads // kv_heads),
                HEAD_DIM=head_dim, BLOCK_SIZE=block_size, MAX_PAGES=max_pages,
                POOL_ROW=num_blocks * block_size * head_dim, TILE=tile,
                NUM_SPLITS=choose_num_splits(batch, kv_heads, -(-max_pages * block_size // tile), config),
                SCALE_LOG2=scale * LOG2E, EXACT=q.dtype == jnp.float32)


@functools.partial(jax.jit, static_argnames=('scale', 'config'))
def paged_decode_attention_triton(q, k_pages, v_pages, layer, block_tables, context_lens, scale: float,
                                  config: TritonConfig = TritonConfig()):
    """Same contract as ``paged_decode.paged_decode_attention_pallas`` (inputs validated by the
    caller, pools layer-stacked); GPU only."""
    try:
        import jax_triton
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    batch, num_heads, head_dim = q.shape
    consts = kernel_constants(q, k_pages, block_tables, scale, config)
    num_splits = consts['NUM_SPLITS']
    out_shapes = split_out_shapes(batch, num_splits, num_heads, head_dim, q.dtype)
    unused = [jax.ShapeDtypeStruct((1,), jnp.float32)] * (3 - len(out_shapes))   # one split: no max, sum
    outs = jax_triton.triton_call(
        layer.astype(jnp.int32).reshape(1), context_lens, block_tables, q, k_pages, v_pages,
        kernel=triton_kernel(), out_shape=out_shapes + unused, grid=(batch, k_pages.shape[1], num_splits),
        num_warps=config.num_warps, num_stages=config.num_stages, name='paged_decode_attention_triton', **consts)
    return finish_splits(list(outs)[:len(out_shapes)], q.dtype, False)
