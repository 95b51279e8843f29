"""The KV write (new K/V rows into their slots of layer-stacked pools): the Pallas kernel against
its reference, timed in place (``TIMER``)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_write import pallas_gpu as write_gpu
from pallas_kernels.kv_write.api import write_kv

from ._common import op_impls

SWEEP = {'block_tokens': [8, 32, 128], 'num_warps': [2, 4, 8]}
SWEEPS = (SWEEP,)
LAYERS = 2          # the write goes to the last layer of a stack of this many
TIMER = 'in_place'
ROWS = True         # cases from --tokens (new tokens per call), not batches x contexts


def impls(args):
    return op_impls(args, functools.partial(write_kv, impl='reference'), write_gpu.write_kv_pallas,
                    write_gpu.WriteConfig, SWEEP)


def make_case(args, tokens, _context, seed):
    """Layer-stacked pools of at least ``--min-pool-mb`` each, and ``sets`` sets of ``tokens``
    new K/V rows at distinct random slots (block 0 left out), enough sets that their rows exceed
    ``--min-pool-mb`` (L2 is 50 MB), so repeated calls neither read nor write in L2. Bytes: the new
    K and V read once and written once, and the slots; calls carry the pools, donated."""
    bs, itemsize = args.block_size, jnp.dtype(args.dtype).itemsize
    row_bytes = args.kv_heads * args.head_dim * itemsize          # one token's K (or V)
    min_bytes = args.min_pool_mb * 2**20
    sets = max(1, min(args.calls, -(-min_bytes // (2 * tokens * row_bytes))))
    num_blocks = max(-(-min_bytes // (LAYERS * bs * row_bytes)), 1 + -(-sets * tokens // bs))
    rng = np.random.default_rng(seed)
    slots = (bs + rng.permutation((num_blocks - 1) * bs)[:sets * tokens]).reshape(sets, tokens)
    shape = (LAYERS, args.kv_heads, num_blocks, bs, args.head_dim)
    keys = jax.random.split(jax.random.key(seed), 4)
    k, v = (jax.random.normal(key, shape, args.dtype) for key in keys[:2])
    k_new, v_new = (jax.random.normal(key, (sets, tokens, args.kv_heads, args.head_dim), args.dtype)
                    for key in keys[2:])
    return {'k': k, 'v': v, 'k_new': k_new, 'v_new': v_new, 'slots': jnp.asarray(slots, jnp.int32),
            'bytes': 4 * tokens * row_bytes + 4 * tokens, 'flops': 0}


def call(fn, case, new_set):
    return fn(case['k'], case['v'], case['k_new'][new_set], case['v_new'][new_set],
              case['slots'][new_set], jnp.int32(LAYERS - 1))


def check_rows(fn, case):
    """Every layer's rows at the first set's slots: the written layer's, and the others'
    (unchanged)."""
    k, v = call(fn, case, 0)
    flat = (*k.shape[:2], -1, k.shape[-1])                     # [layers, kv_heads, slots, d]
    return jnp.stack([p.reshape(flat)[:, :, case['slots'][0]] for p in (k, v)])
