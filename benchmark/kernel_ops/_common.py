"""What the op modules share: random paged pools, the attention ops' window and cap options, the
keys a query sees, and the implementations and launch configs an op is run with."""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

CHECK_ROWS = 8            # rows each implementation's output is checked on


def make_pages(args, batch, context, seed):
    """Pools of random pages behind ``sets`` disjoint random block-table sets, enough sets that
    the pages of all sets exceed ``--min-pool-mb`` (L2 is 50 MB)."""
    bs, itemsize = args.block_size, jnp.dtype(args.dtype).itemsize
    blocks = -(-context // bs)
    set_bytes = 2 * batch * blocks * bs * args.kv_heads * args.head_dim * itemsize
    sets = max(1, min(args.calls, -(-args.min_pool_mb * 2**20 // set_bytes)))
    num_blocks = 1 + sets * batch * blocks
    rng = np.random.default_rng(seed)
    tables = rng.permutation(np.arange(1, num_blocks)).reshape(sets, batch, blocks).astype(np.int32)
    if args.ragged:
        lens = rng.integers(1, context + 1, size=batch, dtype=np.int32)
    else:
        lens = np.full(batch, context, np.int32)
    key_k, key_v = jax.random.split(jax.random.key(seed))
    shape = (args.kv_heads, num_blocks, bs, args.head_dim)
    k = jax.random.normal(key_k, shape, args.dtype)
    v = jax.random.normal(key_v, shape, args.dtype)
    return k, v, jnp.asarray(tables), jnp.asarray(lens)


def attention_options(args) -> dict:
    """The attention ops' sliding window and soft cap from ``--sliding-window`` / ``--soft-cap``."""
    return dict(sliding_window=args.sliding_window, logits_soft_cap=args.soft_cap)


def kernel_options(args) -> dict:
    """``attention_options`` as the Pallas kernels take them (the window an int32 scalar)."""
    window = None if args.sliding_window is None else jnp.int32(args.sliding_window)
    return dict(window=window, soft_cap=args.soft_cap)


def keys_seen(first, last, window):
    """Sum, per row, over the query positions ``first .. last`` (int arrays, inclusive) of the
    keys each query sees: ``p + 1``, or at most ``window`` of them (None: no window)."""
    a, b = np.asarray(first, np.int64) + 1, np.asarray(last, np.int64) + 1       # keys of the first, last
    c = b if window is None else np.clip(window, a - 1, b)       # the last query count below the window
    return (c * (c + 1) - (a - 1) * a) // 2 + (b - c) * (0 if window is None else window)


def op_impls(args, reference, pallas, config_class, sweep):
    """name -> [(config label, fn)] for every implementation asked for: ``reference`` as is, and
    ``pallas(..., config=, interpret=)`` for each launch config (``configs``)."""
    impls = {}
    for name in args.impls:
        if name == 'reference':
            impls[name] = [(None, reference)]
        elif name in ('pallas', 'pallas_interpret'):
            impls[name] = [(cfg, functools.partial(pallas, config=cfg, interpret=name == 'pallas_interpret'))
                           for cfg in configs(args, config_class, sweep)]
    return impls


def configs(args, config_class, sweep):
    """The default launch config, or with ``--sweep`` every combination of ``sweep``."""
    if not args.sweep:
        return [config_class()]
    return [config_class(**dict(zip(sweep, values))) for values in itertools.product(*sweep.values())]
