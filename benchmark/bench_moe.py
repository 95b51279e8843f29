"""One MoE layer's expert MLP (``lmdeploy_jax/models/layers/moe.py``) on the GPU, bf16, at a real
model's expert shapes: for each token count and path (``grouped_xla``: XLA's ragged_dot GEMMs over
the choices sorted by expert; ``grouped_pallas``: the same through the Pallas grouped-GEMM kernel,
the path the layer takes on a GPU; ``per_choice``: each choice's expert weights gathered), the time, the
bytes of the chosen experts' weights and of every expert's (``per_choice_sliced``: the
weights sliced per choice rather than gathered, an alternative to ``per_choice``), the FLOPs of the routed tokens, and
the bandwidth and FLOP rate those imply, beside the card's measured ceilings (a copy's bandwidth,
a large bf16 matmul's FLOP rate).

Whether a path reads the weights of experts that receive no token shows in its time: at one token
(k experts chosen) a path that reads only those takes about ``chosen bytes / copy bandwidth``; one
that reads every expert takes about ``all bytes / copy bandwidth``.

    python benchmark/bench_moe.py [--shape qwen3-30b-a3b|mixtral-8x7b] [--tokens 1 4 16 64 512 4096]
    XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true python benchmark/bench_moe.py   # cuDNN's
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmdeploy_jax.models.layers.moe import grouped_mlp, per_choice_mlp, route

# experts, chosen per token, hidden, expert width
SHAPES = {'qwen3-30b-a3b': (128, 8, 2048, 768), 'mixtral-8x7b': (8, 2, 4096, 14336)}


def per_choice_sliced_mlp(x, experts, gate_up, down, act):
    """``per_choice_mlp`` with each choice's weights sliced out of the stacks one choice at a time
    (``dynamic_index_in_dim``, which cuBLAS may read in place) instead of gathered into a copy: the
    alternative to measure against it."""
    choices, k = experts.reshape(-1), experts.shape[1]
    rows = []
    for j in range(choices.shape[0]):
        w1 = jax.lax.dynamic_index_in_dim(gate_up, choices[j], keepdims=False)
        w2 = jax.lax.dynamic_index_in_dim(down, choices[j], keepdims=False)
        gate, up = jnp.split(x[j // k] @ w1.T, 2)
        rows.append((act(gate) * up) @ w2.T)
    return jnp.stack(rows)


PATHS = {'grouped_xla': functools.partial(grouped_mlp, impl='reference'),
         'grouped_pallas': functools.partial(grouped_mlp, impl='pallas'),
         'per_choice': per_choice_mlp, 'per_choice_sliced': per_choice_sliced_mlp}
SLICED_MAX_CHOICES = 64       # the sliced loop is unrolled: only for small steps


def timed(fn, *args, iters: int = 20) -> float:
    """Median seconds of ``fn(*args)`` (compiled and warmed first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def ceilings() -> dict[str, float]:
    """The card's copy bandwidth (bytes/s, read + write of 2 GiB) and bf16 matmul rate (FLOP/s)."""
    x = jnp.ones((1 << 30,), jnp.bfloat16)
    copy = timed(jax.jit(lambda x: x + 1), x)
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    mm = timed(jax.jit(lambda a: a @ a), a)
    return {'copy_bytes_per_s': 2 * x.nbytes / copy, 'matmul_flop_per_s': 2 * 8192 ** 3 / mm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shape', choices=SHAPES, default='qwen3-30b-a3b')
    parser.add_argument('--tokens', type=int, nargs='+', default=[1, 4, 16, 64, 512, 4096])
    args = parser.parse_args()
    E, k, hidden, inter = SHAPES[args.shape]
    limits = ceilings()
    print(json.dumps({'device': jax.devices()[0].device_kind, 'shape': args.shape, **limits}))
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    gate_up = (jax.random.normal(keys[0], (E, 2 * inter, hidden)) * 0.02).astype(jnp.bfloat16)
    down = (jax.random.normal(keys[1], (E, hidden, inter)) * 0.02).astype(jnp.bfloat16)
    expert_bytes = (gate_up.nbytes + down.nbytes) // E
    for n in args.tokens:
        x = jax.random.normal(keys[2], (n, hidden)).astype(jnp.bfloat16)
        weights, experts = route(jax.random.normal(keys[3], (n, E)), k, True)
        chosen = len(np.unique(np.asarray(experts)))
        flops = 2 * n * k * 3 * inter * hidden
        for name, mlp in PATHS.items():
            if name == 'per_choice_sliced' and n * k > SLICED_MAX_CHOICES:
                continue
            fn = jax.jit(lambda x, e, g, d, mlp=mlp: mlp(x, e, g, d, jax.nn.silu))
            seconds = timed(fn, x, experts, gate_up, down)
            print(json.dumps({
                'tokens': n, 'path': name, 'ms': round(seconds * 1e3, 4), 'experts_chosen': chosen,
                'chosen_bytes': chosen * expert_bytes, 'all_bytes': E * expert_bytes,
                'chosen_bytes_per_s': chosen * expert_bytes / seconds, 'all_bytes_per_s': E * expert_bytes / seconds,
                'flop_per_s': flops / seconds,
                'chosen_bytes_fraction_of_copy': chosen * expert_bytes / seconds / limits['copy_bytes_per_s'],
                'flop_fraction_of_matmul': flops / seconds / limits['matmul_flop_per_s']}))


if __name__ == '__main__':
    main()
