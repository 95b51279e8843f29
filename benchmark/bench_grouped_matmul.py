"""The grouped matmul op (``pallas_kernels/grouped_matmul``) on the GPU, bf16, at real models' expert
shapes: the Pallas kernel beside XLA's ``ragged_dot`` (the reference), each checked against the
other, for a range of routed token counts.

For each (shape, projection, tokens, implementation) one JSON line: the median time; the bytes a
step must read (``bytes``: the weights of the experts that received rows, read once, plus the
rows in and out) and the FLOPs of the routed rows; the bandwidth and FLOP rate those imply, and
their fractions of the card's measured ceilings (a copy's bandwidth, a large bf16 matmul's rate:
``bench_moe.ceilings``). ``all_expert_bytes`` is what a path that reads every expert would need.
At decode sizes the kernel should approach the copy bandwidth on ``bytes``; at prefill sizes the
matmul rate.

Tokens are routed by a random router's top-k (uniform on average), sorted by expert as the MoE
layer sorts them. ``--sweep`` also times the kernel under each launch config of ``SWEEP``.

    python benchmark/bench_grouped_matmul.py [--shape qwen3-30b-a3b mixtral-8x7b] [--tokens 1 8 64 512 4096]
    python benchmark/bench_grouped_matmul.py --sweep --tokens 1 4096
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
from bench_moe import SHAPES, ceilings, timed  # noqa: E402

from lmdeploy_jax.models.layers.moe import route  # noqa: E402
from pallas_kernels.grouped_matmul.api import grouped_matmul  # noqa: E402
from pallas_kernels.grouped_matmul.pallas_gpu import GroupedConfig, grouped_matmul_pallas  # noqa: E402

# launch configs tried by --sweep (block_m None: the default's rows per tile); 3 stages of the
# largest tiles take 192 KiB of sm_90's 227 KiB of shared memory
SWEEP = [GroupedConfig(m, n, k, w, 3) for m, n, k, w in itertools.product((None, 16, 64, 128), (64, 128), (64, 128),
                                                                         (4, 8))]


def projections(shape: str) -> dict[str, tuple[int, int, bool]]:
    """An expert's ``(K, N, gathered)`` per projection, as the MoE layer runs them: gate and up
    fused (``hidden -> 2 * inter``), reading each token's row through ``lhs_rows``; down, over
    rows already in sorted order."""
    _, _, hidden, inter = SHAPES[shape]
    return {'gate_up': (hidden, 2 * inter, True), 'down': (inter, hidden, False)}


def routed(key, tokens: int, experts: int, k: int) -> tuple[jax.Array, jax.Array, int]:
    """``tokens`` tokens each routed to ``k`` experts by a random router, as the MoE layer sorts
    them: the int32 ``[experts]`` group sizes, each sorted choice's token (int32 ``[tokens * k]``,
    the layer's ``lhs_rows``), and how many experts received a row."""
    _, chosen = route(jax.random.normal(key, (tokens, experts)), k, True)
    choices = chosen.reshape(-1)
    sizes = jnp.bincount(choices, length=experts).astype(jnp.int32)
    return sizes, (jnp.argsort(choices, stable=True) // k).astype(jnp.int32), int(jnp.sum(sizes > 0))


def row(limits, seconds, bytes_read, flops, **fields) -> dict:
    return {**fields, 'ms': round(seconds * 1e3, 4), 'bytes': bytes_read, 'flops': flops,
            'bytes_per_s': bytes_read / seconds, 'flop_per_s': flops / seconds,
            'bytes_fraction_of_copy': round(bytes_read / seconds / limits['copy_bytes_per_s'], 4),
            'flop_fraction_of_matmul': round(flops / seconds / limits['matmul_flop_per_s'], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shape', choices=SHAPES, nargs='+', default=list(SHAPES))
    parser.add_argument('--tokens', type=int, nargs='+', default=[1, 8, 64, 512, 4096])
    parser.add_argument('--sweep', action='store_true', help='also time every launch config of SWEEP')
    args = parser.parse_args()
    limits = ceilings()
    print(json.dumps({'device': jax.devices()[0].device_kind, **limits}))
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 64))
    for shape in args.shape:
        E, k, _, _ = SHAPES[shape]
        for name, (K, N, gathered) in projections(shape).items():
            rhs = (jax.random.normal(next(keys), (E, N, K)) * 0.02).astype(jnp.bfloat16)   # [out, in] per expert
            expert_bytes = rhs.nbytes // E
            for tokens in args.tokens:
                M = tokens * k
                sizes, rows, active = routed(next(keys), tokens, E, k)
                lhs = jax.random.normal(next(keys), (tokens if gathered else M, K)).astype(jnp.bfloat16)
                rows = rows if gathered else None
                inputs = (lhs, rhs, sizes, rows)
                bytes_read = active * expert_bytes + lhs.nbytes + M * N * 2
                case = dict(shape=shape, projection=name, tokens=tokens, rows=M, experts_active=active,
                            all_expert_bytes=rhs.nbytes)
                impls = {impl: jax.jit(lambda x, w, s, r, impl=impl: grouped_matmul(
                    x, w, s, lhs_rows=r, transpose_rhs=True, impl=impl)) for impl in ('reference', 'pallas')}
                expected = impls['reference'](*inputs).astype(jnp.float32)
                scale = float(jnp.max(jnp.abs(expected)))
                for impl, fn in impls.items():
                    error = float(jnp.max(jnp.abs(fn(*inputs).astype(jnp.float32) - expected))) / scale
                    print(json.dumps(row(limits, timed(fn, *inputs), bytes_read, 2 * M * K * N, **case,
                                         impl=impl, max_error_vs_reference=error)))
                for config in SWEEP if args.sweep else ():
                    fn = jax.jit(lambda x, w, s, r, c=config: grouped_matmul_pallas(
                        x, w[None], s, jnp.zeros((), jnp.int32), True, c, lhs_rows=r))
                    print(json.dumps(row(limits, timed(fn, *inputs), bytes_read, 2 * M * K * N, **case,
                                         impl='pallas', config=dataclasses.asdict(config))))


if __name__ == '__main__':
    main()
