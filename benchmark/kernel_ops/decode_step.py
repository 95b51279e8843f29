"""The decode step (rope, KV write and decode attention in one op): the Pallas kernel against its
reference, timed in place (``TIMER``). It is the op the engine serves decode with
(``lmdeploy_jax/models/layers/attention.py``).

llama3-8b's attention (32 query heads, 8 KV heads, head dim 128, bf16 pages of 64 tokens: the
flags below, also ``bench_kernels.py``'s defaults) at batch 128 x context 4096, each record with
its ratio to the read bandwidth measured first in the same run (``ratio_to_measured_read``)::

    python benchmark/bench_kernels.py --ops decode_step --impls reference pallas --batches 128 \
        --contexts 4096 --heads 32 --kv-heads 8 --head-dim 128 --dtype bfloat16 --block-size 64

and over long contexts (the reference only checks the first rows)::

    python benchmark/bench_kernels.py --ops decode_step --impls pallas --contexts 2048 4096 --batches 128 256
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._flash_decoding import DecodeConfig
from pallas_kernels.decode_step_attention import pallas_gpu as step_gpu
from pallas_kernels.decode_step_attention.api import decode_step_attention

from ._common import CHECK_ROWS, attention_options, kernel_options, keys_seen, make_pages, op_impls

SWEEP = dict(tile_tokens=[32, 64, 128], num_warps=[4, 8], num_stages=[3, 5, 7], page_tiles=[False, True])
SWEEPS = (SWEEP,)
TIMER = 'in_place'


def impls(args):
    scale = args.head_dim ** -0.5
    return op_impls(args, functools.partial(decode_step_attention, scale=scale, impl='reference',
                                            **attention_options(args)),
                    functools.partial(step_gpu.decode_step_attention_pallas, scale=scale, **kernel_options(args)),
                    DecodeConfig, SWEEP)


def make_case(args, batch, context, seed):
    """``make_pages``' pools as a stack of one layer; each row's new token at position context - 1,
    at its slot in every table set; a random fused qkv and the rope tables at those positions.
    Bytes: the cached K and V read, qkv and the rope tables read, the new K and V written, the output."""
    k, v, tables, lens = make_pages(args, batch, context, seed)
    bs, itemsize = args.block_size, jnp.dtype(args.dtype).itemsize
    pos = np.asarray(lens) - 1
    slots = np.asarray(tables)[:, np.arange(batch), pos // bs] * bs + pos % bs          # [sets, B]
    width = (args.heads + 2 * args.kv_heads) * args.head_dim
    qkv = jax.random.normal(jax.random.key(seed + 1), (batch, width), args.dtype)
    inv_freq = 1.0 / 10000 ** (np.arange(0, args.head_dim, 2) / args.head_dim)
    angles = np.concatenate([pos[:, None] * inv_freq] * 2, axis=-1).astype(np.float32)
    keys = keys_seen(pos, pos, args.sliding_window)                # the new token's among them
    kv_bytes = 2 * int((keys - 1).sum()) * args.kv_heads * args.head_dim * itemsize
    io_bytes = (width + 2 * args.kv_heads * args.head_dim + args.heads * args.head_dim) * batch * itemsize
    return dict(qkv=qkv, cos=jnp.asarray(np.cos(angles)), sin=jnp.asarray(np.sin(angles)), k=k[None], v=v[None],
                tables=tables, lens=lens, slots=jnp.asarray(slots, jnp.int32),
                bytes=kv_bytes + io_bytes + 2 * batch * args.head_dim * 4,
                flops=4 * int(keys.sum()) * args.heads * args.head_dim)


def call(fn, case, table_set):
    return fn(case['qkv'], case['cos'], case['sin'], case['k'], case['v'], jnp.int32(0), case['slots'][table_set],
              case['tables'][table_set], case['lens'])


def check_rows(fn, case):
    """The first rows' outputs and the K/V they wrote at their slots."""
    n = min(CHECK_ROWS, case['qkv'].shape[0])
    slots = case['slots'][0, :n]
    out, k, v = fn(case['qkv'][:n], case['cos'][:n], case['sin'][:n], case['k'], case['v'], jnp.int32(0), slots,
                   case['tables'][0, :n], case['lens'][:n])
    flat = (k.shape[1], -1, k.shape[-1])                          # [kv_heads, slots, d] of layer 0
    return jnp.concatenate([out.reshape(-1)] + [p[0].reshape(flat)[:, slots].reshape(-1) for p in (k, v)])
