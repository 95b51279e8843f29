"""Paged prefill attention as a Pallas kernel (Triton lowering): causal flash attention of a chunk
of new tokens over the row's cached prefix and the chunk itself, both read from the pages.

Why this shape: prefill is matmul-bound, so a program must give the tensor cores tall tiles. One
program owns (row, KV head, block of ``block_q`` query tokens); its matmul rows are those tokens
times the KV head's query heads (GQA), ``block_q * group`` rows, so each K/V tile loaded serves
every query head that shares it. The program walks K/V tiles from position 0 up to its last
token's position (the causal bound; tiles past it are never loaded) with an online softmax. With a
sliding window the walk starts at its first token's window instead (tiles before it are never
loaded either), and each token masks the positions before its own window.

Row layout: matmul row ``r`` is token ``r // group_pad`` of the block and head ``r % group_pad``
of the group (group padded to a power of two; padded heads are masked out of the loads and
stores). Query token ``i`` of row ``b`` sits at position ``context_lens[b] - query_lens[b] + i``.

Quantized pools (``kv_quant.QuantizedPages``): each K/V tile's codes and scales are loaded and
dequantized in registers to q's dtype (``_pallas_tiles.load_kv_tile``); nothing else changes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .._pallas_tiles import (MIN_DOT, WIDEST_TUNED_HEAD, Logits, attention_unsupported, in_span, init_state,
                             layer_head, load_kv_tile, next_pow2, normalise, pool_rows, softmax_step, split_refs,
                             tile_for, window_input, window_of, window_start)


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Launch knobs: ``block_rows`` matmul rows per program (query tokens x group heads, a power
    of two >= 16), ``tile_tokens`` KV positions per loop step for 16-bit inputs; both count heads
    up to 128 wide, and halve for 256-wide heads (``tile_for``, ``rows_for``) so a program's
    registers and shared memory stay those of a 128-wide one; ``tile_tokens`` halves for float32
    too."""
    block_rows: int = 64
    tile_tokens: int = 64
    num_warps: int = 4
    num_stages: int = 3


MAX_GROUP = 64          # query heads per KV head: a program's rows hold at least one token's group


def unsupported(q, k_pages) -> str | None:
    """Why this kernel cannot take these inputs, or None (``attention_unsupported``, and at most
    ``MAX_GROUP`` query heads per KV head)."""
    group = q.shape[-2] // k_pages.shape[-4]
    if next_pow2(group) > MAX_GROUP:
        return f'{group} query heads per KV head: the prefill kernel takes at most {MAX_GROUP}'
    return attention_unsupported(q.dtype, k_pages.shape[-1])


def rows_for(block_rows: int, head_dim: int) -> int:
    """Matmul rows per program for ``head_dim``: ``block_rows`` up to 128 wide, proportionally
    fewer for wider heads (at least 16, the smallest Triton dot)."""
    return max(MIN_DOT, block_rows * WIDEST_TUNED_HEAD // max(head_dim, WIDEST_TUNED_HEAD))


def choose_block_q(tokens: int, group_pad: int, config: PrefillConfig, head_dim: int = WIDEST_TUNED_HEAD) -> int:
    """Query tokens per program: ``rows_for`` rows' worth, no more than the chunk needs, and at
    least 16 rows (the smallest Triton dot)."""
    block_q = max(1, rows_for(config.block_rows, head_dim) // group_pad)
    block_q = min(block_q, next_pow2(tokens))
    return max(block_q, -(-MIN_DOT // group_pad))


def _prefill_kernel(layer_ref, ctx_ref, qlen_ref, tables_ref, q_ref, k_ref, v_ref, *refs, windowed, kv_heads,
                    group, group_pad, block_q, block_size, tile, logits):
    """One (row b, kv head h, query block j) of layer ``layer_ref[0]``."""
    window_ref, (o_ref,) = split_refs(refs, windowed)
    window = window_of(window_ref)
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pool_head = layer_head(layer_ref, kv_heads, h)
    tokens = q_ref.shape[1]
    ctx = jnp.minimum(ctx_ref[b], tables_ref.shape[1] * block_size)
    qlen = jnp.minimum(qlen_ref[b], jnp.minimum(tokens, ctx))
    start = ctx - qlen                                         # position of query token 0

    r = jnp.arange(block_q * group_pad)
    token = j * block_q + lax.div(r, group_pad)
    lane = lax.rem(r, group_pad)
    row_ok = (lane < group) & (token < tokens)                # a real (token, head) of q
    token_ok = token < qlen                                    # ...that is not padding
    q_pos = (start + token)[:, None]
    token_i, head_i = token[:, None], (h * group + lane)[:, None]
    cols = jnp.arange(q_ref.shape[-1])[None, :]
    q = plgpu.load(q_ref.at[b, token_i, head_i, cols], mask=(row_ok & token_ok)[:, None], other=0)

    # The block's last real token bounds the keys it sees (a block of padding sees none), its
    # first token's window the first.
    last_token = jnp.minimum((j + 1) * block_q, qlen) - 1
    kv_end = jnp.where(j * block_q < qlen, start + last_token + 1, 0)
    kv_begin = window_start(window, start + j * block_q)
    q_begin = window_start(window, q_pos)

    def body(t, state):
        pos = t * tile + jnp.arange(tile)
        valid = in_span(pos, kv_begin, kv_end)
        k, v = load_kv_tile(tables_ref, k_ref, v_ref, b, pool_head, pos, valid, block_size, dtype=q.dtype)
        mask = valid[None, :] & in_span(pos[None, :], q_begin, q_pos + 1)
        return softmax_step(state, q, k, v, mask, logits)

    first_tile = 0 if window is None else lax.div(kv_begin, tile)
    acc, _, l = lax.fori_loop(first_tile, pl.cdiv(kv_end, tile), body,
                              init_state(block_q * group_pad, q.shape[-1]))
    out = jnp.where(token_ok[:, None], normalise(acc, l), 0.0)
    plgpu.store(o_ref.at[b, token_i, head_i, cols], out.astype(o_ref.dtype), mask=row_ok[:, None])


@functools.partial(jax.jit, static_argnames=('scale', 'soft_cap', 'config', 'interpret'))
def paged_prefill_attention_pallas(q, k_pages, v_pages, layer, block_tables, context_lens, query_lens,
                                   scale: float, window=None, soft_cap: float | None = None,
                                   config: PrefillConfig = PrefillConfig(), interpret: bool = False):
    """Same contract as ``api.paged_prefill_attention`` (inputs already validated there; pools
    layer-stacked; ``window`` an int32 scalar or None, ``soft_cap`` a float or None)."""
    batch, tokens, num_heads, head_dim = q.shape
    layers, kv_heads, num_blocks, block_size, _ = k_pages.shape
    group = num_heads // kv_heads
    group_pad = next_pow2(group)
    block_q = choose_block_q(tokens, group_pad, config, head_dim)
    # Float32 dots run as IEEE FMAs on the CUDA cores, their operands in registers: twice the
    # warps keep a 64-row tile from spilling (with 4 warps a thread's operands do not fit its
    # registers on sm_90).
    warps = config.num_warps * (2 if q.dtype == jnp.float32 else 1)
    k_rows, v_rows, layer = pool_rows(k_pages, v_pages, layer)
    kernel = functools.partial(
        _prefill_kernel, windowed=window is not None, kv_heads=kv_heads, group=group, group_pad=group_pad,
        block_q=block_q, block_size=block_size, tile=tile_for(config.tile_tokens, q.dtype, head_dim),
        logits=Logits(scale, soft_cap))
    return pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, pl.cdiv(tokens, block_q)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=config.num_stages),
        interpret=interpret,
        name='paged_prefill_attention',
    )(layer, context_lens, query_lens, block_tables, q, k_rows, v_rows, *window_input(window))
