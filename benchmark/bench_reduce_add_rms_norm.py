#!/usr/bin/env python3
"""The ``reduce_add_rms_norm`` op on several GPUs: the CUDA kernel (``p2p_cuda``) against the
reference (XLA's all-reduce, then ``add_rms_norm``) on fresh random inputs, and the time of each.

    python3 benchmark/bench_reduce_add_rms_norm.py --tp 2 --hidden 4096 --rows 1 2 4

Correctness: one call, each of ``s`` and the norm against the reference, and every device's copy
of the (replicated) result bit-equal to device 0's; then a chain of ``--calls`` calls inside one
jitted loop (each call's outputs feeding the next, as in a decode step's layers), which exercises
the kernel's mailboxes taken in turn, against the same chain through the reference. Speed: the chain's
time per call (the loop compiled as one CUDA graph, with two small fusions a call besides the op),
for both; a batch-1 llama3-8b decode step makes 64 such calls at hidden 4096.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bench_common import print_result
from pallas_kernels.reduce_add_rms_norm.api import prepare_kernel, reduce_add_rms_norm

EPS = 1e-5
LAYERS = 4
# the chain's loop as one CUDA graph (on a GPU), so its time is the devices' and not the host's
# launches; XLA's all-reduce joins the graph only with COLLECTIVES
IN_ONE_GRAPH = {'xla_gpu_enable_command_buffer': 'FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL,COLLECTIVES'}


def chain(mesh: Mesh, devices, calls: int):
    """``calls`` ops in a loop under ``shard_map``: each device's next partial is its share of the
    last norm, the residual the last sum halved (so the values stay in range)."""
    def body(partial, residual, weight):
        tp = jax.lax.axis_size('tp')
        share = (jax.lax.axis_index('tp') + 1).astype(jnp.float32) / (tp * (tp + 1) / 2)

        def step(i, carry):
            p, x = carry
            s, normed = reduce_add_rms_norm(p, x, weight, EPS, i % LAYERS, axis_name='tp', devices=devices)
            return (normed.astype(jnp.float32) * share).astype(p.dtype), (s.astype(jnp.float32) * 0.5).astype(s.dtype)
        p, x = jax.lax.fori_loop(0, calls, step, (partial[0], residual))
        return p[None], x
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P('tp'), P(), P()), out_specs=(P('tp'), P()),
                                 check_vma=False))


def one_call(mesh: Mesh, devices):
    def body(partial, residual, weight):
        return reduce_add_rms_norm(partial[0], residual, weight, EPS, 1, axis_name='tp', devices=devices)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P('tp'), P(), P()), out_specs=(P(), P()),
                                 check_vma=False))


def replicas_agree(array: jax.Array) -> bool:
    first = np.asarray(array.addressable_shards[0].data)
    return all(np.array_equal(np.asarray(s.data), first) for s in array.addressable_shards[1:])


def max_error(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def timed_us(fn, args, calls: int, repeats: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) / calls * 1e6, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tp', type=int, default=2)
    parser.add_argument('--hidden', type=int, default=4096)
    parser.add_argument('--rows', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--calls', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--kernel-optional', action='store_true',
                        help='where the kernel cannot run, compare the reference with itself (a CPU smoke run)')
    args = parser.parse_args()
    devices = jax.devices()[:args.tp]
    claim = prepare_kernel(devices)          # kept for the run
    kernel = not isinstance(claim, str)
    if not kernel and not args.kernel_optional:
        raise SystemExit(f'the CUDA kernel is not ready: {claim}')
    mesh = Mesh(np.array(devices), ('tp',))
    rng = np.random.default_rng(args.seed)
    weight = jax.device_put(jnp.asarray(rng.uniform(0.5, 1.5, (LAYERS, args.hidden)), jnp.bfloat16),
                            NamedSharding(mesh, P()))
    for rows in args.rows:
        partial = jax.device_put(jnp.asarray(rng.standard_normal((args.tp, rows, args.hidden)), jnp.bfloat16),
                                 NamedSharding(mesh, P('tp')))
        residual = jax.device_put(jnp.asarray(rng.standard_normal((rows, args.hidden)), jnp.bfloat16),
                                  NamedSharding(mesh, P()))
        inputs = (partial, residual, weight)
        (s, normed), (s_ref, normed_ref) = (one_call(mesh, d)(*inputs) for d in (tuple(devices), None))
        options = IN_ONE_GRAPH if devices[0].platform == 'gpu' else {}
        chained, chained_ref = (chain(mesh, d, args.calls).lower(*inputs).compile(compiler_options=options)
                                for d in (tuple(devices), None))
        (p_out, x_out), (p_ref, x_ref) = chained(*inputs), chained_ref(*inputs)
        print_result(dict(
            bench='reduce_add_rms_norm', kernel=kernel, tp=args.tp, rows=rows, hidden=args.hidden,
            device=devices[0].device_kind,
            sum_max_error=max_error(s, s_ref), norm_max_error=max_error(normed, normed_ref),
            replicas_agree=replicas_agree(s) and replicas_agree(normed) and replicas_agree(x_out),
            chain_calls=args.calls, chain_sum_max_error=max_error(x_out, x_ref),
            chain_partial_max_error=max_error(p_out, p_ref),
            kernel_us_per_call=timed_us(chained, inputs, args.calls),
            reference_us_per_call=timed_us(chained_ref, inputs, args.calls)))


if __name__ == '__main__':
    main()
