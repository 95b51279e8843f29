#!/usr/bin/env python3
"""How long one all-reduce of a decode step takes under XLA, per way of compiling it.

    python3 benchmark/bench_allreduce.py --tp 2                        # on a 2-GPU machine
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmark/bench_allreduce.py \\
        --tp 2 --sizes 64 --reps 4 --iters 2 --variants default        # CPU smoke run

Why: at tp=2 a llama3-8b decode step at batch 1 does 64 all-reduces of 4096 values (two a
layer), so their latency, not their bandwidth, decides whether tensor parallelism pays at small
batches. Each variant compiles the same function with its own XLA options through
``Lowered.compile(compiler_options=...)``, the per-executable form of ``XLA_FLAGS``, so all of
them run in one process on the same devices: ``--reps`` dependent ``psum``s of a [rows, 4096]
bf16 block under ``shard_map`` in a ``fori_loop`` (each needs the previous one's result, as the
layers do), against the same loop without the ``psum`` (its cost is subtracted). One JSON line per
(variant, size); a variant XLA rejects prints its error and the run goes on.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmdeploy_jax.engine.xla_flags import SMALL_BATCH_TP_OPTIONS  # noqa: E402

AXIS = 'tp'
VARIANTS = {      # name -> XLA options; GPU-only options are ignored by the CPU backend
    'default': {},
    'oneshot': {'xla_gpu_unsupported_use_all_reduce_one_shot_kernel': True},
    'nccl': {'xla_gpu_unsupported_use_all_reduce_one_shot_kernel': False},
    'nccl_sync_graph': SMALL_BATCH_TP_OPTIONS,      # what the engine gives its small-batch decode calls
    'oneshot_sync': {'xla_gpu_unsupported_use_all_reduce_one_shot_kernel': True,
                     'xla_gpu_disable_async_collectives': 'ALLREDUCE'},
}


def loop(reps: int, reduce: bool, block: jax.Array) -> jax.Array:
    """``reps`` dependent steps on this device's block: the mean over devices plus one (with
    ``reduce``), or the same arithmetic without the all-reduce."""
    n = jax.lax.psum(1, AXIS)

    def step(_, x):
        y = jax.lax.psum(x, AXIS) if reduce else x * n
        return (y / n + 1).astype(x.dtype)
    return jax.lax.fori_loop(0, reps, step, block)


def compiled(mesh: Mesh, reps: int, reduce: bool, x: jax.Array, options: dict):
    fn = jax.shard_map(functools.partial(loop, reps, reduce), mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS),
                       check_vma=False)
    return jax.jit(fn).lower(x).compile(compiler_options=options or None)


def median_seconds(fn, x, iters: int) -> float:
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check(out: jax.Array, x: jax.Array, tp: int, reps: int) -> float:
    """Largest relative error against the mean over devices plus ``reps``."""
    blocks = np.asarray(x, np.float32).reshape(tp, -1, x.shape[-1])
    want = blocks.mean(axis=0) + reps
    got = np.asarray(out, np.float32).reshape(tp, -1, x.shape[-1])
    return float(np.max(np.abs(got - want) / np.abs(want)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tp', type=int, default=2)
    parser.add_argument('--sizes', type=int, nargs='+', default=[4096, 32768, 262144, 1048576],
                        help='values per all-reduce (4096 = batch 1 of a 4096-wide model)')
    parser.add_argument('--reps', type=int, default=64, help='all-reduces per call (64 = a llama3-8b step)')
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--dtype', default='bfloat16')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    mesh = Mesh(np.asarray(jax.devices()[:args.tp]), (AXIS,))
    for size in args.sizes:
        width = min(size, 4096)
        host = np.random.default_rng(size).standard_normal((args.tp * (size // width), width)) + 4
        x = jax.device_put(jnp.asarray(host, args.dtype), NamedSharding(mesh, P(AXIS)))
        for name in args.variants:
            record = dict(bench='allreduce', device=jax.devices()[0].device_kind, tp=args.tp, size=size,
                          dtype=args.dtype, reps=args.reps, variant=name, jax=jax.__version__)
            try:
                with_reduce = compiled(mesh, args.reps, True, x, VARIANTS[name])
                without = compiled(mesh, args.reps, False, x, VARIANTS[name])
                record['rel_error'] = check(with_reduce(x), x, args.tp, args.reps)
                total, base = median_seconds(with_reduce, x, args.iters), median_seconds(without, x, args.iters)
                record.update(call_us=round(total * 1e6, 1), loop_only_us=round(base * 1e6, 1),
                              per_allreduce_us=round((total - base) / args.reps * 1e6, 2))
            except Exception as e:      # one variant XLA rejects must not stop the others
                record['failed'] = f'{type(e).__name__}: {str(e)[:200]}'
            print(json.dumps(record), flush=True)


if __name__ == '__main__':
    main()
