#!/usr/bin/env python3
"""Paged decode attention over unquantized, 8-bit and 4-bit KV pages (``pallas_kernels.kv_quant``,
LMDeploy's ``quant_policy`` 0, 8 and 4) on one device: each checked against the XLA reference over
the same pages, then timed, the quantized kernels against the unquantized one of the same run.

    python benchmark/bench_kv_quant.py                     # llama3-8b heads, batches 1 and 64, 2048 and 8192 positions
    python benchmark/bench_kv_quant.py --impl pallas_interpret --batches 2 --contexts 128 --heads 4 \\
        --kv-heads 2 --calls 2 --iters 1 --min-pool-mb 1      # CPU smoke run

Inputs and timing are ``bench_kernels.py``'s (``kernel_ops._common.make_pages``, ``time_calls``:
``--calls`` calls in one jitted loop over rotating block-table sets, the median of ``--iters``
runs). Bytes count what a
call must read: each row's K and V (for quantized pages their codes and their float32 scale and
zero point per position and KV head), q and the output. One JSON line per case.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from bench_kernels import relative_error, time_calls  # noqa: E402
from pallas_kernels import kv_quant  # noqa: E402
from experiments import paged_decode as decode_gpu  # noqa: E402
from experiments.paged_decode import paged_decode_attention  # noqa: E402
from kernel_ops._common import make_pages  # noqa: E402

POLICIES = (0, 8, 4)          # quant_policy: 0 unquantized, else bits


def pages_of(k, v, policy):
    """The case's K/V pools as a quant_policy stores them, as a flat dict of arrays (the timer
    passes only arrays)."""
    if policy == 0:
        return dict(k=k, v=v)
    quantize = jax.jit(functools.partial(kv_quant.quantize, bits=policy))
    (kc, ksz), (vc, vsz) = quantize(k), quantize(v)
    return dict(kc=kc, ksz=ksz, vc=vc, vsz=vsz)


def pools(arrays, policy):
    if policy == 0:
        return arrays['k'], arrays['v']
    return (kv_quant.QuantizedPages(arrays['kc'], arrays['ksz'], policy),
            kv_quant.QuantizedPages(arrays['vc'], arrays['vsz'], policy))


def call(policy, impl, scale):
    """fn(fn_unused, arrays, table_set) as ``time_calls`` wants: one decode over the set's tables."""
    def run(_, arrays, table_set):
        k, v = pools(arrays, policy)
        tables, lens = arrays['tables'][table_set], arrays['lens']
        if impl == 'reference':
            return paged_decode_attention(arrays['q'], k, v, tables, lens, scale, impl='reference')
        stack = jax.tree.map(lambda a: a[None], (k, v))
        return decode_gpu.paged_decode_attention_pallas(arrays['q'], *stack, jnp.int32(0), tables, lens, scale,
                                                        interpret=impl == 'pallas_interpret')
    return run


def read_bytes(args, lens, policy) -> int:
    """K and V of every row's positions, and q read and the output written."""
    itemsize = jnp.dtype(args.dtype).itemsize
    per_position = args.kv_heads * (args.head_dim * itemsize if policy == 0 else args.head_dim * policy // 8 + 8)
    io_bytes = 2 * len(lens) * args.heads * args.head_dim * itemsize
    return int(2 * np.asarray(lens, np.int64).sum() * per_position + io_bytes)


def run_case(args, batch, context, seed):
    k, v, tables, lens = make_pages(args, batch, context, seed)
    q = jax.random.normal(jax.random.key(seed + 1), (batch, args.heads, args.head_dim), args.dtype)
    scale = args.head_dim ** -0.5
    base_us = None
    for policy in POLICIES:
        arrays = dict(pages_of(k, v, policy), q=q, tables=tables, lens=lens)
        rows = min(8, batch)
        check = dict(arrays, q=q[:rows], lens=lens[:rows], tables=tables[:, :rows])
        error = relative_error(call(policy, args.impl, scale)(None, check, 0).astype(jnp.float32),
                               call(policy, 'reference', scale)(None, check, 0).astype(jnp.float32))
        median, best = time_calls(None, arrays, call(policy, args.impl, scale), args)
        nbytes = read_bytes(args, lens, policy)
        base_us = base_us or median * 1e6
        print(json.dumps(dict(op='decode', quant_policy=policy, impl=args.impl, batch=batch, context=context,
                              heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
                              device=str(jax.devices()[0].device_kind), rel_error=error, us=median * 1e6,
                              best_us=best * 1e6, gb_read=nbytes / 1e9, tbps=nbytes / median / 1e12,
                              speedup_vs_policy0=base_us / (median * 1e6))), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--impl', default='pallas', choices=['pallas', 'pallas_interpret', 'reference'])
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 64])
    parser.add_argument('--contexts', type=int, nargs='+', default=[2048, 8192])
    parser.add_argument('--block-size', type=int, default=64)
    parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    parser.add_argument('--heads', type=int, default=32)
    parser.add_argument('--kv-heads', type=int, default=8)
    parser.add_argument('--head-dim', type=int, default=128)
    parser.add_argument('--ragged', action='store_true', help='lengths uniform in [1, context]')
    parser.add_argument('--calls', type=int, default=10)
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--min-pool-mb', type=int, default=256)
    args = parser.parse_args()
    for seed, (batch, context) in enumerate((b, c) for b in args.batches for c in args.contexts):
        run_case(args, batch, context, seed)


if __name__ == '__main__':
    main()
