"""Pieces the Pallas (Triton) attention kernels share: gathering a tile of K/V rows from the page
pools, and one online-softmax step over it.

A pool is viewed as ``[kv_heads, num_blocks * block_size, head_dim]``: position ``p`` of a row lives
at token row ``table[p // block_size] * block_size + p % block_size``. Each tile reads whole
``head_dim`` rows (16-byte vectors, coalesced within a page) and only the positions a mask allows,
so no byte outside a sequence's context is read. Scores stay in the log2 domain (pre-multiplied by
``scale * log2(e)``) so the exponentials are ``exp2``.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
MIN_DOT = 16                      # the smallest M, N and K of a Triton dot
# Float32 dots default to TF32 on the tensor cores (~1e-3 relative error); HIGHEST keeps them
# IEEE float32, which the float32 engine needs to match the PyTorch reference token for token.
# It changes nothing for 16-bit inputs.
EXACT = lax.Precision.HIGHEST


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def triton_supports(dtype, head_dim: int) -> bool:
    """What every Pallas kernel here needs: a 16/32-bit float dtype and a power-of-two head_dim
    of at least ``MIN_DOT`` (Triton tiles have power-of-two extents)."""
    return (dtype in (jnp.bfloat16, jnp.float16, jnp.float32)
            and head_dim >= MIN_DOT and head_dim & (head_dim - 1) == 0)


def tile_for(tile_tokens: int, dtype) -> int:
    """KV positions per tile: ``tile_tokens`` counts 16-bit positions; float32 tiles hold half as
    many, so a tile's bytes (and the pipeline's shared memory) stay the same."""
    return max(MIN_DOT, tile_tokens * 2 // jnp.dtype(dtype).itemsize)


def pool_rows(k_pages, v_pages, layer):
    """Layer-stacked pools ``[layers, kv_heads, num_blocks, block_size, d]`` as token rows
    ``[layers * kv_heads, num_blocks * block_size, d]`` (a free, row-major reshape), so a kernel
    addresses (layer, KV head) ``h`` as row ``base + h``; and ``base`` = layer * kv_heads, int32 [1]."""
    layers, kv_heads, num_blocks, block_size, d = k_pages.shape
    shape = (layers * kv_heads, num_blocks * block_size, d)
    base = (layer * kv_heads).astype(jnp.int32).reshape(1)
    return k_pages.reshape(shape), v_pages.reshape(shape), base


def load_kv_tile(tables_ref, k_ref, v_ref, b, h, pos, valid, block_size):
    """K and V rows ``[len(pos), head_dim]`` of row ``b``, KV head ``h`` at positions ``pos``
    (non-negative); rows where ``valid`` is False are zeros and are not read."""
    # pos >= 0, so C division (lax.div/rem) is floor division without the sign fix-ups.
    page = plgpu.load(tables_ref.at[b, lax.div(pos, block_size)], mask=valid, other=0)
    rows = (page * block_size + lax.rem(pos, block_size))[:, None]
    cols = jnp.arange(k_ref.shape[-1])[None, :]
    k = plgpu.load(k_ref.at[h, rows, cols], mask=valid[:, None], other=0)
    v = plgpu.load(v_ref.at[h, rows, cols], mask=valid[:, None], other=0)
    return k, v


def init_state(rows: int, head_dim: int):
    """(acc, running max, running sum) of an online softmax over no positions yet."""
    return (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def softmax_step(state, q, k, v, mask, scale_log2: float):
    """Fold one tile into the state. Every row must see at least one unmasked position in its
    first tile (else its max stays -inf and the next step makes NaN)."""
    acc, m, l = state
    scores = plgpu.dot(q, k, trans_b=True, precision=EXACT) * scale_log2     # f32 [rows, tile]
    scores = jnp.where(mask, scores, -jnp.inf)
    m_new = jnp.maximum(m, scores.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(scores - m_new[:, None])
    l_new = l * alpha + p.sum(axis=1)
    acc_new = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=EXACT)
    return acc_new, m_new, l_new


def normalise(acc, l):
    """acc / l, with rows that saw no position (l == 0, acc == 0) left at zero."""
    return acc / jnp.where(l > 0, l, 1.0)[:, None]
