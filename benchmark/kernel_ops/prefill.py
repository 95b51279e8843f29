"""Paged prefill attention: the Pallas kernel against its reference."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.prefill_attention import pallas_gpu as prefill_gpu
from pallas_kernels.prefill_attention.api import paged_prefill_attention

from ._common import attention_options, kernel_options, keys_seen, make_pages, op_impls

SWEEP = dict(block_rows=[64, 128], tile_tokens=[32, 64], num_warps=[4, 8], num_stages=[3, 4])
SWEEPS = (SWEEP,)


def impls(args):
    scale = args.head_dim ** -0.5
    return op_impls(args, functools.partial(paged_prefill_attention, scale=scale, impl='reference',
                                            **attention_options(args)),
                    functools.partial(_pallas_prefill, scale=scale, **kernel_options(args)), prefill_gpu.PrefillConfig,
                    SWEEP)


def _pallas_prefill(q, k, v, tables, lens, qlens, *, scale, window, soft_cap, config, interpret):
    return prefill_gpu.paged_prefill_attention_pallas(q, k[None], v[None], jnp.int32(0), tables, lens, qlens, scale,
                                                      window, soft_cap, config=config, interpret=interpret)


def make_case(args, batch, chunk, seed):
    """Rows of ``chunk`` new tokens after ``--prefix`` cached ones (ragged: chunks in
    [1, chunk]); bytes as ``decode.make_case``'s, plus the FLOPs of the positions each query sees."""
    if batch * chunk > args.max_prefill_tokens:
        raise ValueError(f'{batch * chunk} query tokens > --max-prefill-tokens; skipped')
    k, v, tables, lens = make_pages(args, batch, args.prefix + chunk, seed)
    qlens = lens - args.prefix if not args.ragged else jnp.asarray(
        np.random.default_rng(seed).integers(1, chunk + 1, size=batch, dtype=np.int32))
    ctx = qlens + args.prefix
    q = jax.random.normal(jax.random.key(seed + 1), (batch, chunk, args.heads, args.head_dim),
                          args.dtype)
    itemsize = jnp.dtype(args.dtype).itemsize
    ctx_np, qlen_np = np.asarray(ctx, np.int64), np.asarray(qlens, np.int64)
    # query i of a row attends to start + i + 1 positions, or the window's; the first one's window
    # starts the positions read
    start, window = ctx_np - qlen_np, args.sliding_window
    attended = int(keys_seen(start, ctx_np - 1, window).sum())
    first_key = 0 if window is None else np.maximum(start - window + 1, 0)
    kv_bytes = 2 * int((ctx_np - first_key).sum()) * args.kv_heads * args.head_dim * itemsize
    io_bytes = 2 * int(qlen_np.sum()) * args.heads * args.head_dim * itemsize
    return dict(q=q, k=k, v=v, tables=tables, lens=ctx, qlens=qlens, bytes=kv_bytes + io_bytes,
                flops=4 * attended * args.heads * args.head_dim)


def call(fn, case, table_set):
    return fn(case['q'], case['k'], case['v'], case['tables'][table_set], case['lens'],
              case['qlens'])


def check_rows(fn, case):
    n = min(2, case['q'].shape[0])
    return fn(case['q'][:n], case['k'], case['v'], case['tables'][0, :n], case['lens'][:n],
              case['qlens'][:n])
