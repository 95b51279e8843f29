"""Decode attention alone (q roped, K/V cached): the Pallas kernel (``experiments/paged_decode.py``)
and the other decode kernels of ``benchmark/experiments``, against its reference."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from experiments import mosaic_gpu as decode_mosaic
from experiments import paged_decode as decode_gpu
from experiments import triton_jax as decode_triton
from experiments.paged_decode import paged_decode_attention

from ._common import CHECK_ROWS, attention_options, configs, kernel_options, keys_seen, make_pages, op_impls

SWEEP = dict(tile_tokens=[32, 64, 128], num_warps=[4, 8], num_stages=[3, 5, 7],
             page_tiles=[False, True])     # also the decode step's
MOSAIC_SWEEP = dict(stages=[2, 3, 4])
TRITON_SWEEP = dict(tile_tokens=[32, 64, 128], num_warps=[4, 8], num_stages=[2, 3, 5])
SWEEPS = (SWEEP, MOSAIC_SWEEP, TRITON_SWEEP)
EXTRA_IMPLS = ('jax_ops', 'mosaic', 'jax_triton')     # decode only; none takes a sliding window or soft cap


def impls(args):
    """fn(q, k, v, tables, lens) of every implementation asked for, for each of its launch configs.
    Decode only: ``jax_ops`` is JAX's own Pallas paged attention, ``mosaic`` the Pallas Mosaic GPU
    kernel (``experiments/mosaic_gpu.py``), ``jax_triton`` a plain Triton kernel through jax_triton
    (``experiments/triton_jax.py``; install it first: ``pip install --no-deps --target /tmp/jt-site
    .whl/jax_triton-0.3.1-py3-none-any.whl``), none with a sliding window or soft cap. With
    ``--sweep`` the Pallas decode and decode-step grids include ``page_tiles`` (one page number per
    tile, as the jax_triton kernel reads pages; a no-op where a tile is longer than a page)."""
    scale = args.head_dim ** -0.5
    impls = op_impls(args, functools.partial(paged_decode_attention, scale=scale, impl='reference',
                                             **attention_options(args)),
                     functools.partial(_stacked_decode, decode_gpu.paged_decode_attention_pallas, scale=scale,
                                       **kernel_options(args)),
                     decode_gpu.DecodeConfig, SWEEP)
    if 'jax_ops' in args.impls:
        impls['jax_ops'] = [(None, _jax_ops_decode(scale))]
    alternatives = (('mosaic', decode_mosaic.paged_decode_attention_mosaic, decode_mosaic.MosaicConfig, MOSAIC_SWEEP),
                    ('jax_triton', decode_triton.paged_decode_attention_triton, decode_triton.TritonConfig,
                     TRITON_SWEEP))
    for name, kernel, config_class, sweep in alternatives:
        if name in args.impls:
            impls[name] = [(cfg, functools.partial(_stacked_decode, kernel, scale=scale, config=cfg))
                           for cfg in configs(args, config_class, sweep)]
    return impls


def _stacked_decode(kernel, q, k, v, tables, lens, **launch):
    """A decode kernel on one layer's pools, as a stack of one (``launch``:
    its scale and launch arguments)."""
    return kernel(q, k[None], v[None], jnp.int32(0), tables, lens, **launch)


def _jax_ops_decode(scale):
    """JAX's own (deprecated) Pallas GPU paged attention, for comparison."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    return lambda q, k, v, t, l: paged_attention(q * jnp.asarray(scale, q.dtype), k, v, t, l,
                                                 k_splits=math.gcd(16, t.shape[1]))


def make_case(args, batch, context, seed):
    """One query token per row over ``context`` cached ones; bytes: K and V of every row's context
    (inside its window, with ``--sliding-window``), q read and the output written."""
    k, v, tables, lens = make_pages(args, batch, context, seed)
    q = jax.random.normal(jax.random.key(seed + 1), (batch, args.heads, args.head_dim), args.dtype)
    itemsize = jnp.dtype(args.dtype).itemsize
    keys = int(keys_seen(np.asarray(lens) - 1, np.asarray(lens) - 1, args.sliding_window).sum())
    kv_bytes = 2 * keys * args.kv_heads * args.head_dim * itemsize
    io_bytes = 2 * batch * args.heads * args.head_dim * itemsize
    flops = 4 * keys * args.heads * args.head_dim
    return dict(q=q, k=k, v=v, tables=tables, lens=lens, bytes=kv_bytes + io_bytes, flops=flops)


def call(fn, case, table_set):
    return fn(case['q'], case['k'], case['v'], case['tables'][table_set], case['lens'])


def check_rows(fn, case):
    """The first rows only, so the reference fits in memory at any batch."""
    n = min(CHECK_ROWS, case['q'].shape[0])
    return fn(case['q'][:n], case['k'], case['v'], case['tables'][0, :n], case['lens'][:n])
