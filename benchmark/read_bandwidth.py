#!/usr/bin/env python3
"""The card's read bandwidth: a large random array read once per call by a jitted reduction.

    python benchmark/read_bandwidth.py                           # 4 GiB of bf16 on a GPU
    python benchmark/read_bandwidth.py --gib 8 --dtypes bfloat16 float32
    python benchmark/read_bandwidth.py --gib 0.004 --iters 2     # CPU smoke run

A decode step only reads (weights, KV pages) and writes almost nothing, so its ceiling is the rate
at which the card can read, not the rate of a copy (``bench_kernels.py``'s ``a + 1``), whose
writes share the memory with its reads and slow them. A sum reads each byte once and writes a
few: the bytes counted are the array's alone.

Each reduction of ``REDUCTIONS`` (to a scalar, per row, per column; XLA emits a different kernel
for each) is timed as ``--calls`` back-to-back dispatches waited for together (the dispatch cost
is paid once per run, not per call), median over ``--iters`` runs after ``--warmup``; the
bandwidth is the array's bytes over the median seconds per call, and the ceiling (``tbps``) the
fastest reduction's. The array must dwarf the last-level cache, so that every call reads it from
memory: ``--gib`` defaults to ``DEFAULT_GIB`` on a GPU and to a small array elsewhere.
One ``RESULT {json}`` line per dtype.

``measure_read_tbps`` is what ``profile_generation.py`` and ``bench_kernels.py`` call to set their
rates against the ceiling measured in the same process.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from bench_common import device_description, print_result

COLUMNS = 8192
DEFAULT_GIB = 4.0                 # on a GPU: far larger than any GPU's last-level cache
OTHER_GIB = 1 / 64                # elsewhere (a CPU): enough to time, cheap to make
REDUCTIONS = {
    'all': lambda x: jnp.sum(x, dtype=jnp.float32),
    'rows': lambda x: jnp.sum(x, axis=1, dtype=jnp.float32),
    'columns': lambda x: jnp.sum(x, axis=0, dtype=jnp.float32),
}


def default_gib() -> float:
    """``DEFAULT_GIB`` on a GPU, ``OTHER_GIB`` on any other backend."""
    return DEFAULT_GIB if jax.default_backend() == 'gpu' else OTHER_GIB


def random_array(gib: float, dtype: str, seed: int = 0) -> jax.Array:
    """Standard normal values of ``dtype``, ``[rows, COLUMNS]`` with ``rows`` the most that fit in
    ``gib`` GiB (at least one); ValueError for a size that is not positive."""
    if not gib > 0:
        raise ValueError(f'gib must be positive, got {gib}')
    rows = max(1, int(gib * 2**30) // (COLUMNS * jnp.dtype(dtype).itemsize))
    return jax.jit(lambda key: jax.random.normal(key, (rows, COLUMNS), dtype))(jax.random.key(seed))


def seconds_per_call(fn, x: jax.Array, calls: int, iters: int, warmup: int) -> float:
    """Median over ``iters`` runs (after ``warmup``) of the seconds per call of ``calls`` back-to-back
    dispatches of ``fn(x)``, waited for together."""
    if calls < 1 or iters < 1:
        raise ValueError(f'calls and iters must be at least 1, got {calls} and {iters}')
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        jax.block_until_ready([fn(x) for _ in range(calls)])
        if i >= warmup:
            times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def measure_read(x: jax.Array, reductions=tuple(REDUCTIONS), calls: int = 10, iters: int = 10,
                 warmup: int = 2) -> dict:
    """The read bandwidth of each reduction (``REDUCTIONS``' names) of ``x``, and the ceiling:
    ``{'bytes', 'dtype', 'shape', 'reductions': {name: {'time_us', 'tbps'}}, 'reduction', 'tbps'}``
    (``reduction``, ``tbps``: the fastest). ValueError naming an unknown reduction."""
    unknown = set(reductions) - set(REDUCTIONS)
    if unknown or not reductions:
        raise ValueError(f'reductions {sorted(unknown) or "(none)"}: choose from {sorted(REDUCTIONS)}')
    rates = {}
    for name in reductions:
        seconds = seconds_per_call(jax.jit(REDUCTIONS[name]), x, calls, iters, warmup)
        rates[name] = {'time_us': seconds * 1e6, 'tbps': x.nbytes / seconds / 1e12}
    best = max(rates, key=lambda name: rates[name]['tbps'])
    return {'bytes': x.nbytes, 'dtype': str(x.dtype), 'shape': list(x.shape), 'reductions': rates,
            'reduction': best, 'tbps': rates[best]['tbps']}


def measure_read_tbps(gib: float | None = None, dtype: str = 'bfloat16', seed: int = 0, **timing) -> dict:
    """``measure_read`` of a ``random_array`` of ``gib`` GiB (None: ``default_gib()``), plus
    ``gib``, ``device`` and ``jax``; the array is freed before it returns, so the caller's engine
    sees the device memory it had. ``timing``: ``measure_read``'s keyword arguments."""
    gib = default_gib() if gib is None else gib
    x = random_array(gib, dtype, seed)
    try:
        record = measure_read(x, **timing)
    finally:
        x.delete()
    return {'gib': record['bytes'] / 2**30, **record, 'device': device_description(), 'jax': jax.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--gib', type=float, default=None,
                        help=f'array size (default: {DEFAULT_GIB} on a GPU, {OTHER_GIB:g} elsewhere)')
    parser.add_argument('--dtypes', nargs='+', default=['bfloat16'], choices=['bfloat16', 'float16', 'float32'])
    parser.add_argument('--reductions', nargs='+', default=list(REDUCTIONS), choices=list(REDUCTIONS))
    parser.add_argument('--calls', type=int, default=10, help='back-to-back calls per timed run')
    parser.add_argument('--iters', type=int, default=10, help='timed runs (the median is reported)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    for dtype in args.dtypes:
        record = measure_read_tbps(args.gib, dtype, args.seed, reductions=args.reductions, calls=args.calls,
                                   iters=args.iters, warmup=args.warmup)
        print(f'{record["device"]} {dtype}: {record["tbps"]:.3f} TB/s read ({record["reduction"]} reduction of '
              f'{record["gib"]:.3g} GiB)', flush=True)
        print_result({'bench': 'read_bandwidth', **record})


if __name__ == '__main__':
    main()
