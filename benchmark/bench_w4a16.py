"""The W4A16 matmul (``pallas_kernels/w4a16``) on the GPU at llama3-8b's projection shapes, beside
a bf16 matmul of the same shape (XLA, cuBLAS) and the XLA reference (dequantize, then matmul), the
kernel checked against the reference first.

For each (projection, M, implementation) one JSON line: the median time; the bytes it must read
(``bytes``: 4-bit codes, float16 scales and zeros, or the bf16 weight; plus x and the output) and
the FLOPs; the bandwidth and FLOP rate those imply and their fractions of the card's measured
ceilings (``bench_moe.ceilings``); and ``speedup_vs_bf16``. At decode M the kernel should read its
quarter of the bytes near the copy bandwidth (up to ~4x the bf16 matmul); at prefill M approach
the bf16 matmul rate. ``--sweep`` also times each ``SWEEP`` launch config.

    python benchmark/bench_w4a16.py [--m 1 8 64 512 4096] [--group 128] [--sweep]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_moe import ceilings, timed  # noqa: E402

from pallas_kernels.w4a16.api import w4a16_matmul  # noqa: E402
from pallas_kernels.w4a16.pallas_gpu import W4Config, config_for  # noqa: E402

# llama3-8b (hidden 4096, 32 q / 8 kv heads of 128, intermediate 14336): projection -> (K, N)
PROJECTIONS = {'qkv': (4096, 6144), 'o': (4096, 4096), 'gate_up': (4096, 2 * 14336), 'down': (14336, 4096)}
SWEEP = [W4Config(m, n, s, w, st) for m, n, s, w, st in
         itertools.product((16, 64, 128), (32, 64, 128), (1, 2, 4, 8), (4, 8), (3, 4))]


def random_weights(key, k: int, n: int, group: int):
    """(qweight int32 [K // 8, N], scales and zeros float16 [K // group, N]) of random codes."""
    a, b, c = jax.random.split(key, 3)
    qweight = jax.random.bits(a, (k // 8, n), jnp.uint32).view(jnp.int32)
    scales = jax.random.uniform(b, (k // group, n), jnp.float32, 0.001, 0.004).astype(jnp.float16)
    zeros = jax.random.randint(c, (k // group, n), 0, 16).astype(jnp.float16)
    return qweight, scales, zeros


def line(limits, name, m, impl, seconds, read_bytes, flops, **extra) -> dict:
    return dict(projection=name, m=m, impl=impl, us=seconds * 1e6, bytes=read_bytes,
                gb_per_s=read_bytes / seconds / 1e9, tflop_per_s=flops / seconds / 1e12,
                bandwidth_fraction=read_bytes / seconds / limits['copy_bytes_per_s'],
                flop_fraction=flops / seconds / limits['matmul_flop_per_s'], **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--m', type=int, nargs='+', default=[1, 8, 64, 512, 4096])
    parser.add_argument('--group', type=int, default=128)
    parser.add_argument('--projection', choices=PROJECTIONS, nargs='+', default=list(PROJECTIONS))
    parser.add_argument('--sweep', action='store_true')
    args = parser.parse_args()
    limits = ceilings()
    print(json.dumps({'device': jax.devices()[0].device_kind, 'group': args.group, **limits}), flush=True)
    key = jax.random.PRNGKey(0)
    for name in args.projection:
        k, n = PROJECTIONS[name]
        qweight, scales, zeros = random_weights(key, k, n, args.group)
        dense = (jax.random.normal(key, (k, n)) * 0.02).astype(jnp.bfloat16)
        quant_bytes = qweight.nbytes + scales.nbytes + zeros.nbytes
        for m in args.m:
            x = jax.random.normal(key, (m, k)).astype(jnp.bfloat16)
            io_bytes = x.nbytes + m * n * 2
            flops = 2 * m * k * n
            ref = jax.jit(lambda x, q, s, z: w4a16_matmul(x, q, s, z, impl='reference'))
            kernel = jax.jit(lambda x, q, s, z: w4a16_matmul(x, q, s, z, impl='pallas'))
            want, got = ref(x, qweight, scales, zeros), kernel(x, qweight, scales, zeros)
            error = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
            scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
            bf16 = timed(jax.jit(lambda x, w: x @ w), x, dense)
            print(json.dumps(line(limits, name, m, 'bf16_matmul', bf16, dense.nbytes + io_bytes, flops)), flush=True)
            for impl, fn in (('w4a16_reference', ref), ('w4a16_pallas', kernel)):
                t = timed(fn, x, qweight, scales, zeros)
                extra = dict(config=dataclasses.asdict(config_for(m, n, k)), max_abs_error=error,
                             max_abs_output=scale) if impl == 'w4a16_pallas' else {}
                print(json.dumps(line(limits, name, m, impl, t, quant_bytes + io_bytes, flops,
                                      speedup_vs_bf16=bf16 / t, **extra)), flush=True)
            if args.sweep:
                for config in SWEEP:
                    widest_m = max(16, 1 << (m - 1).bit_length())
                    if n % config.block_n or (k // 128) % config.splits or config.block_m > widest_m:
                        continue
                    fn = jax.jit(lambda x, q, s, z, c=config: w4a16_matmul(x, q, s, z, impl='pallas', config=c))
                    try:
                        t = timed(fn, x, qweight, scales, zeros, iters=5)
                    except Exception as e:      # a config past the shared memory: reported, the sweep goes on
                        print(json.dumps(dict(projection=name, m=m, config=dataclasses.asdict(config),
                                              error=str(e)[:200])), flush=True)
                        continue
                    print(json.dumps(line(limits, name, m, 'w4a16_sweep', t, quant_bytes + io_bytes, flops,
                                          speedup_vs_bf16=bf16 / t, config=dataclasses.asdict(config))), flush=True)


if __name__ == '__main__':
    main()
