#!/usr/bin/env python3
"""The kernel ops on one device: each implementation checked against the XLA reference, then timed.

    python benchmark/bench_kernels.py --sweep                          # decode; --sweep: launch knobs
    python benchmark/bench_kernels.py --ops prefill kv_write decode_step rms_norm add_rms_norm
    python benchmark/bench_kernels.py --impls reference pallas_interpret --batches 2 \
        --contexts 128 --heads 4 --kv-heads 2 --iters 2 --no-copy     # CPU smoke run
    PYTHONPATH=/tmp/jt-site python benchmark/bench_kernels.py --batches 1 64 --contexts 2048 \
        --impls reference pallas mosaic jax_triton     # decode alternatives (``decode_impls``)

Each case's implementations are checked on the same inputs (``run_case``), then timed as
``--calls`` back-to-back calls inside one jitted function (``time_calls``), reporting the median
per call, the bytes and FLOPs the op must move (each ``*_case``) and their ratios to the card's
copy bandwidth and matmul rate (``--copy-tbps``, ``--matmul-tflops``; the defaults are the H100's
of benchmark/NOTES.md) and to the copy this run measures. One JSON line per case; a failing
implementation prints its error and the run goes on; a table of the results comes last.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from pallas_kernels.decode_step_attention import pallas_gpu as step_gpu  # noqa: E402
from pallas_kernels.decode_step_attention.api import decode_step_attention  # noqa: E402
from pallas_kernels.kv_write import pallas_gpu as write_gpu  # noqa: E402
from pallas_kernels.kv_write.api import write_kv  # noqa: E402
from experiments import mosaic_gpu as decode_mosaic  # noqa: E402
from experiments import triton_jax as decode_triton  # noqa: E402
from experiments import paged_decode as decode_gpu  # noqa: E402
from experiments.paged_decode import paged_decode_attention  # noqa: E402
from pallas_kernels.prefill_attention import pallas_gpu as prefill_gpu  # noqa: E402
from pallas_kernels.prefill_attention.api import paged_prefill_attention  # noqa: E402
from pallas_kernels.rms_norm import pallas_gpu as norm_gpu  # noqa: E402
from pallas_kernels.rms_norm.api import add_rms_norm, rms_norm  # noqa: E402

IMPLS = ('reference', 'pallas', 'pallas_interpret', 'jax_ops', 'mosaic', 'jax_triton')   # the last three: decode only
WINDOWLESS = ('jax_ops', 'mosaic', 'jax_triton')       # no sliding window or soft cap
CHECK_ROWS = 8
TOLERANCE = {'float32': 1e-4, 'bfloat16': 2e-2, 'float16': 5e-3}
DECODE_SWEEP = dict(tile_tokens=[32, 64, 128], num_warps=[4, 8], num_stages=[3, 5, 7],
                    page_tiles=[False, True])     # also the decode step's
MOSAIC_SWEEP = dict(stages=[2, 3, 4])
TRITON_SWEEP = dict(tile_tokens=[32, 64, 128], num_warps=[4, 8], num_stages=[2, 3, 5])
PREFILL_SWEEP = dict(block_rows=[64, 128], tile_tokens=[32, 64], num_warps=[4, 8],
                     num_stages=[3, 4])
WRITE_SWEEP = {'block_tokens': [8, 32, 128], 'num_warps': [2, 4, 8]}
WRITE_LAYERS = 2          # the write goes to the last layer of a stack of this many
NORM_SWEEP = {'tile_elems': [1024, 4096, 16384], 'num_warps': [2, 4, 8, 16]}
NORM_EPS = 1e-5


# ---- inputs ---------------------------------------------------------------------------------

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


# ---- decode ---------------------------------------------------------------------------------

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


def decode_impls(args):
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
                     decode_gpu.DecodeConfig, DECODE_SWEEP)
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


def decode_case(args, batch, context, seed):
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


def decode_call(fn, case, table_set):
    return fn(case['q'], case['k'], case['v'], case['tables'][table_set], case['lens'])


def decode_check_rows(fn, case):
    """The first rows only, so the reference fits in memory at any batch."""
    n = min(CHECK_ROWS, case['q'].shape[0])
    return fn(case['q'][:n], case['k'], case['v'], case['tables'][0, :n], case['lens'][:n])


# ---- prefill --------------------------------------------------------------------------------

def prefill_impls(args):
    scale = args.head_dim ** -0.5
    return op_impls(args, functools.partial(paged_prefill_attention, scale=scale, impl='reference',
                                            **attention_options(args)),
                    functools.partial(_pallas_prefill, scale=scale, **kernel_options(args)), prefill_gpu.PrefillConfig,
                    PREFILL_SWEEP)


def _pallas_prefill(q, k, v, tables, lens, qlens, *, scale, window, soft_cap, config, interpret):
    return prefill_gpu.paged_prefill_attention_pallas(q, k[None], v[None], jnp.int32(0), tables, lens, qlens, scale,
                                                      window, soft_cap, config=config, interpret=interpret)


def prefill_case(args, batch, chunk, seed):
    """Rows of ``chunk`` new tokens after ``--prefix`` cached ones (ragged: chunks in
    [1, chunk]); bytes as ``decode_case``'s, plus the FLOPs of the positions each query sees."""
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


def prefill_call(fn, case, table_set):
    return fn(case['q'], case['k'], case['v'], case['tables'][table_set], case['lens'],
              case['qlens'])


def prefill_check_rows(fn, case):
    n = min(2, case['q'].shape[0])
    return fn(case['q'][:n], case['k'], case['v'], case['tables'][0, :n], case['lens'][:n],
              case['qlens'][:n])


# ---- KV write -------------------------------------------------------------------------------

def write_impls(args):
    return op_impls(args, functools.partial(write_kv, impl='reference'), write_gpu.write_kv_pallas,
                    write_gpu.WriteConfig, WRITE_SWEEP)


def write_case(args, tokens, _context, seed):
    """Layer-stacked pools of at least ``--min-pool-mb`` each, and ``sets`` sets of ``tokens``
    new K/V rows at distinct random slots (block 0 left out), enough sets that their rows exceed
    ``--min-pool-mb`` (L2 is 50 MB), so repeated calls neither read nor write in L2. Bytes: the new
    K and V read once and written once, and the slots; calls carry the pools, donated."""
    bs, itemsize = args.block_size, jnp.dtype(args.dtype).itemsize
    row_bytes = args.kv_heads * args.head_dim * itemsize          # one token's K (or V)
    min_bytes = args.min_pool_mb * 2**20
    sets = max(1, min(args.calls, -(-min_bytes // (2 * tokens * row_bytes))))
    num_blocks = max(-(-min_bytes // (WRITE_LAYERS * bs * row_bytes)), 1 + -(-sets * tokens // bs))
    rng = np.random.default_rng(seed)
    slots = (bs + rng.permutation((num_blocks - 1) * bs)[:sets * tokens]).reshape(sets, tokens)
    shape = (WRITE_LAYERS, args.kv_heads, num_blocks, bs, args.head_dim)
    keys = jax.random.split(jax.random.key(seed), 4)
    k, v = (jax.random.normal(key, shape, args.dtype) for key in keys[:2])
    k_new, v_new = (jax.random.normal(key, (sets, tokens, args.kv_heads, args.head_dim), args.dtype)
                    for key in keys[2:])
    return {'k': k, 'v': v, 'k_new': k_new, 'v_new': v_new, 'slots': jnp.asarray(slots, jnp.int32),
            'bytes': 4 * tokens * row_bytes + 4 * tokens, 'flops': 0}


def write_call(fn, case, new_set):
    return fn(case['k'], case['v'], case['k_new'][new_set], case['v_new'][new_set],
              case['slots'][new_set], jnp.int32(WRITE_LAYERS - 1))


def write_check_rows(fn, case):
    """Every layer's rows at the first set's slots: the written layer's, and the others'
    (unchanged)."""
    k, v = write_call(fn, case, 0)
    flat = (*k.shape[:2], -1, k.shape[-1])                     # [layers, kv_heads, slots, d]
    return jnp.stack([p.reshape(flat)[:, :, case['slots'][0]] for p in (k, v)])


def time_in_place_calls(fn, case, call, args):
    """As ``time_calls``, but the pools are the loop's carry and the jit donates them, so every
    call updates the previous call's pools in place (an undonated pool, or one still live after
    the call, would be copied whole each time). ``call`` returns the pools last; its other results
    are folded into the carry, so XLA cannot drop the work that makes them. The case's pools are
    replaced by the updated ones; set ``s``'s slots always receive set ``s``'s rows, so they stay
    checkable."""
    sets = case['slots'].shape[0]
    inputs = {key: value for key, value in case.items() if isinstance(value, jax.Array) and key not in ('k', 'v')}

    @functools.partial(jax.jit, donate_argnums=0)
    def run(pools, inputs):
        def body(i, carry):
            pools, live = carry
            *results, k, v = call(fn, {**inputs, 'k': pools[0], 'v': pools[1]}, i % sets)
            return (k, v), live + sum(r.reshape(-1)[0].astype(jnp.float32) for r in results)
        return jax.lax.fori_loop(0, args.calls, body, (pools, jnp.float32(0.0)))   # all live

    pools = (case['k'], case['v'])
    try:
        for _ in range(args.warmup):
            pools, _ = jax.block_until_ready(run(pools, inputs))
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            pools, _ = jax.block_until_ready(run(pools, inputs))
            times.append((time.perf_counter() - start) / args.calls)
    finally:
        case['k'], case['v'] = pools
    return statistics.median(times), min(times)


# ---- decode step (rope + KV write + decode attention) ----------------------------------------

def step_impls(args):
    scale = args.head_dim ** -0.5
    return op_impls(args, functools.partial(decode_step_attention, scale=scale, impl='reference',
                                            **attention_options(args)),
                    functools.partial(step_gpu.decode_step_attention_pallas, scale=scale, **kernel_options(args)),
                    decode_gpu.DecodeConfig, DECODE_SWEEP)


def step_case(args, batch, context, seed):
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


def step_call(fn, case, table_set):
    return fn(case['qkv'], case['cos'], case['sin'], case['k'], case['v'], jnp.int32(0), case['slots'][table_set],
              case['tables'][table_set], case['lens'])


def step_check_rows(fn, case):
    """The first rows' outputs and the K/V they wrote at their slots."""
    n = min(CHECK_ROWS, case['qkv'].shape[0])
    slots = case['slots'][0, :n]
    out, k, v = fn(case['qkv'][:n], case['cos'][:n], case['sin'][:n], case['k'], case['v'], jnp.int32(0), slots,
                   case['tables'][0, :n], case['lens'][:n])
    flat = (k.shape[1], -1, k.shape[-1])                          # [kv_heads, slots, d] of layer 0
    return jnp.concatenate([out.reshape(-1)] + [p[0].reshape(flat)[:, slots].reshape(-1) for p in (k, v)])


# ---- RMSNorm --------------------------------------------------------------------------------

def norm_impls(args):
    return op_impls(args, functools.partial(rms_norm, eps=NORM_EPS, impl='reference'), _pallas_norm,
                    norm_gpu.NormConfig, NORM_SWEEP)


def _pallas_norm(x, weight, *, config, interpret):
    return norm_gpu.rms_norm_pallas(x, weight[None], jnp.int32(0), NORM_EPS, config=config, interpret=interpret)


def norm_hidden(args) -> int:
    return args.hidden or args.heads * args.head_dim


def norm_case(args, rows, _context, seed):
    """``rows`` random rows of ``norm_hidden`` and a random weight around 1, both of ``--dtype``;
    bytes: the rows read and written, the weight read. Each timed call normalises the previous
    call's output, as a layer's norm reads what the layer before it wrote."""
    hidden, itemsize = norm_hidden(args), jnp.dtype(args.dtype).itemsize
    key_x, key_w = jax.random.split(jax.random.key(seed))
    weight = 1 + jax.random.normal(key_w, (hidden,), args.dtype) / 2
    return {'x': jax.random.normal(key_x, (rows, hidden), args.dtype), 'weight': weight,
            'bytes': (2 * rows + 1) * hidden * itemsize, 'flops': 0}


def norm_call(fn, case):
    return fn(case['x'], case['weight'])


def norm_check_rows(fn, case):
    return fn(case['x'][:CHECK_ROWS], case['weight'])


def add_norm_impls(args):
    return op_impls(args, functools.partial(add_rms_norm, eps=NORM_EPS, impl='reference'), _pallas_add_norm,
                    norm_gpu.NormConfig, NORM_SWEEP)


def _pallas_add_norm(x, residual, weight, *, config, interpret):
    return norm_gpu.rms_norm_pallas(x, weight[None], jnp.int32(0), NORM_EPS, config=config, interpret=interpret,
                                    residual=residual)


def add_norm_case(args, rows, context, seed):
    """``norm_case`` plus a random residual; bytes: x and the residual read, the sum and the norm
    written, the weight read."""
    case = norm_case(args, rows, context, seed)
    case['residual'] = jax.random.normal(jax.random.key(seed + 1), case['x'].shape, args.dtype)
    case['bytes'] = (4 * rows + 1) * norm_hidden(args) * jnp.dtype(args.dtype).itemsize
    return case


def add_norm_call(fn, case):
    """The norm only: what a chained call feeds the next (the sum is written all the same)."""
    return fn(case['x'], case['residual'], case['weight'])[1]


def add_norm_check_rows(fn, case):
    total, normed = fn(case['x'][:CHECK_ROWS], case['residual'][:CHECK_ROWS], case['weight'])
    return jnp.concatenate([total.reshape(-1), normed.reshape(-1)])


# ---- timing ---------------------------------------------------------------------------------

def median_seconds(run, inputs, args):
    """Median and best seconds per call of ``run(inputs)`` (``--calls`` calls) over ``--iters``
    runs after ``--warmup``."""
    for _ in range(args.warmup):
        jax.block_until_ready(run(inputs))
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        jax.block_until_ready(run(inputs))
        times.append((time.perf_counter() - start) / args.calls)
    return statistics.median(times), min(times)


def time_calls(fn, case, call, args):
    """Median seconds per call over ``--iters`` runs of ``--calls`` calls in one jitted loop.

    Each call's query depends on the previous call's output, so XLA can neither merge identical
    calls (common-subexpression elimination) nor overlap them; table sets rotate so repeated
    calls do not re-read pages from L2.
    """
    sets = case['tables'].shape[0]

    @jax.jit
    def run(case_arrays):
        def body(i, carry):
            arrays = dict(case_arrays, q=case_arrays['q'] + carry.astype(case_arrays['q'].dtype))
            out = call(fn, arrays, i % sets)
            return out.reshape(-1)[0].astype(jnp.float32) * 0.0
        return jax.lax.fori_loop(0, args.calls, body, jnp.float32(0.0))

    return median_seconds(run, {k: v for k, v in case.items() if isinstance(v, jax.Array)}, args)


def time_chained_calls(fn, case, call, args):
    """As ``time_calls``, but each call's input ``x`` is the previous call's output: the calls can
    be neither merged nor overlapped, and no other op runs between them."""
    @jax.jit
    def run(case_arrays):
        return jax.lax.fori_loop(0, args.calls, lambda _, x: call(fn, dict(case_arrays, x=x)), case_arrays['x'])

    return median_seconds(run, {k: v for k, v in case.items() if isinstance(v, jax.Array)}, args)


def measure_copy_tbps(args) -> float:
    """A 1 GiB device copy (x + 1, read + write), median of ``--iters`` runs."""
    x = jax.random.normal(jax.random.key(0), (2**29,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    for _ in range(3):
        jax.block_until_ready(f(x))
    times = []
    for _ in range(max(args.iters, 5)):
        start = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / statistics.median(times) / 1e12


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if not np.isfinite(ours).all():
        return float('nan')
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


# ---- driver ---------------------------------------------------------------------------------

OPS = {'decode': (decode_impls, decode_case, decode_call, decode_check_rows),
       'prefill': (prefill_impls, prefill_case, prefill_call, prefill_check_rows),
       'kv_write': (write_impls, write_case, write_call, write_check_rows),
       'decode_step': (step_impls, step_case, step_call, step_check_rows),
       'rms_norm': (norm_impls, norm_case, norm_call, norm_check_rows),
       'add_rms_norm': (add_norm_impls, add_norm_case, add_norm_call, add_norm_check_rows)}
TIMERS = {'kv_write': time_in_place_calls, 'decode_step': time_in_place_calls,
          'rms_norm': time_chained_calls, 'add_rms_norm': time_chained_calls}   # the others: time_calls
ROW_OPS = ('kv_write', 'rms_norm', 'add_rms_norm')      # cases from --tokens, not batches x contexts


def run_case(op, args, batch, context, seed, copy_tbps, results):
    """Check every implementation's first rows against the reference's (relative L2 error, within
    ``TOLERANCE``), then time it (``TIMERS``); emit one record per implementation and config."""
    impls_of, make_case, call, check_rows = OPS[op]
    base = dict(op=op, batch=batch, context=context, block_size=args.block_size, dtype=args.dtype,
                heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                ragged=args.ragged, prefix=args.prefix if op == 'prefill' else None,
                hidden=norm_hidden(args) if op in ('rms_norm', 'add_rms_norm') else None,
                device=str(jax.devices()[0].device_kind),
                jax=jax.__version__)
    try:
        case = make_case(args, batch, context, seed)
    except Exception as e:       # noqa: BLE001 - report and go on
        emit(dict(base, impl='-', failed=f'inputs: {type(e).__name__}: {e}'), results)
        return
    reference = None
    try:
        reference = np.asarray(check_rows(impls_of_reference(op, args), case).astype(jnp.float32))
    except Exception as e:       # noqa: BLE001
        print(f'# reference check rows failed: {type(e).__name__}: {e}', flush=True)
    for name, variants in impls_of(args).items():
        for config, fn in variants:
            record = dict(base, impl=name, config=None if config is None else vars(config))
            try:
                out = np.asarray(check_rows(fn, case).astype(jnp.float32))
                error = relative_error(out, reference) if reference is not None else None
                record['rel_error'] = error
                if error is not None and not error < TOLERANCE[args.dtype]:
                    raise AssertionError(f'wrong result: relative error {error:.3g}')
                median, best = TIMERS.get(op, time_calls)(fn, case, call, args)
                record.update(
                    time_us=median * 1e6, best_us=best * 1e6, bytes=case['bytes'],
                    flops=case['flops'], tbps=case['bytes'] / median / 1e12,
                    tflops=case['flops'] / median / 1e12,
                    ratio_to_card_copy=case['bytes'] / median / 1e12 / args.copy_tbps,
                    ratio_to_card_matmul=case['flops'] / median / 1e12 / args.matmul_tflops)
                if copy_tbps:
                    record['ratio_to_measured_copy'] = case['bytes'] / median / 1e12 / copy_tbps
            except Exception as e:   # noqa: BLE001 - a failing implementation must not stop the run
                record['failed'] = f'{type(e).__name__}: {str(e)[:2000]}'
                if args.verbose:
                    traceback.print_exc()
            emit(record, results)
    del case


def impls_of_reference(op, args):
    ref_args = argparse.Namespace(**dict(vars(args), impls=['reference'], sweep=False))
    return OPS[op][0](ref_args)['reference'][0][1]


def emit(record, results):
    print(json.dumps(record), flush=True)
    results.append(record)


def print_table(results):
    """Decode rates against the copy ceiling, prefill rates against the matmul ceiling."""
    print('\n op      impl              batch context   time_us  TB/s|TF/s ratio  err      config'
          '\n (kv_write: batch = new tokens; TB/s of the new K/V read and written; (add_)rms_norm: batch = rows)')
    for r in results:
        if r.get('op') == 'copy':
            continue
        cfg = r.get('config') or {}
        cfg = ','.join(f'{k}={v}' for k, v in cfg.items()
                       if any(k in sweep for sweep in (DECODE_SWEEP, MOSAIC_SWEEP, TRITON_SWEEP, PREFILL_SWEEP,
                                                       WRITE_SWEEP, NORM_SWEEP)))
        if 'failed' in r:
            print(f" {r['op']:7} {r['impl']:17} {r['batch']:5} {r['context']:7}  FAILED "
                  f"{r['failed'][:80]}")
        else:
            err = r.get('rel_error')
            rate, ratio = ((r['tflops'], r['ratio_to_card_matmul']) if r['op'] == 'prefill'
                           else (r['tbps'], r['ratio_to_card_copy']))
            print(f" {r['op']:7} {r['impl']:17} {r['batch']:5} {r['context']:7} {r['time_us']:9.1f} "
                  f"{rate:8.3f} {ratio:6.2f}  {'-' if err is None else f'{err:.1e}':8} {cfg}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ops', nargs='+', default=['decode'], choices=sorted(OPS))
    parser.add_argument('--impls', nargs='+', default=['reference', 'pallas', 'jax_ops'])
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 8, 64, 256])
    parser.add_argument('--contexts', type=int, nargs='+', default=[512, 2048, 8192])
    parser.add_argument('--tokens', type=int, nargs='+', default=[1, 256, 8192],
                        help='kv_write: new tokens per call; rms_norm, add_rms_norm: rows per call')
    parser.add_argument('--hidden', type=int, default=None,
                        help='(add_)rms_norm: row width (default: heads x head_dim)')
    parser.add_argument('--block-size', type=int, default=64)
    parser.add_argument('--dtype', default='bfloat16', choices=sorted(TOLERANCE))
    parser.add_argument('--heads', type=int, default=32, help='query heads (llama3-8b: 32)')
    parser.add_argument('--kv-heads', type=int, default=8)
    parser.add_argument('--head-dim', type=int, default=128)
    parser.add_argument('--ragged', action='store_true', help='lengths uniform in [1, context]')
    parser.add_argument('--sweep', action='store_true', help='time a grid of Pallas launch configs')
    parser.add_argument('--calls', type=int, default=10, help='calls per timed run')
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--min-pool-mb', type=int, default=256)
    parser.add_argument('--prefix', type=int, default=0, help='prefill: cached tokens before the chunk')
    parser.add_argument('--sliding-window', type=int, default=None, help='attention ops: keys p - window < k <= p')
    parser.add_argument('--soft-cap', type=float, default=None, help='attention ops: scores cap * tanh(scores / cap)')
    parser.add_argument('--max-prefill-tokens', type=int, default=65536)
    parser.add_argument('--copy-tbps', type=float, default=2.91)
    parser.add_argument('--matmul-tflops', type=float, default=726.0)
    parser.add_argument('--no-copy', action='store_true', help='skip measuring the copy bandwidth')
    parser.add_argument('--verbose', action='store_true', help='print tracebacks of failures')
    args = parser.parse_args()
    unknown = set(args.impls) - set(IMPLS)
    if unknown:
        parser.error(f'unknown implementations {sorted(unknown)}; known: {IMPLS}')
    if (args.sliding_window is not None or args.soft_cap is not None) and set(args.impls) & set(WINDOWLESS):
        parser.error(f'{sorted(set(args.impls) & set(WINDOWLESS))} take no --sliding-window or --soft-cap')

    results = []
    copy_tbps = None
    if not args.no_copy:
        copy_tbps = measure_copy_tbps(args)
        emit(dict(op='copy', tbps=copy_tbps, device=str(jax.devices()[0].device_kind)), results)
    seeds = itertools.count()
    for op in args.ops:
        cases = ([(n, 0) for n in args.tokens] if op in ROW_OPS
                 else itertools.product(args.batches, args.contexts))
        for batch, context in cases:
            run_case(op, args, batch, context, next(seeds), copy_tbps, results)
    print_table(results)


if __name__ == '__main__':
    main()
