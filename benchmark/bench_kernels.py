#!/usr/bin/env python3
"""The kernel ops on one device: each implementation checked against the XLA reference, then timed.

    python benchmark/bench_kernels.py --sweep                          # decode; --sweep: launch knobs
    python benchmark/bench_kernels.py --ops prefill kv_write decode_step rms_norm add_rms_norm
    python benchmark/bench_kernels.py --impls reference pallas_interpret --batches 2 \
        --contexts 128 --heads 4 --kv-heads 2 --iters 2 --no-copy     # CPU smoke run
    PYTHONPATH=/tmp/jt-site python benchmark/bench_kernels.py --batches 1 64 --contexts 2048 \
        --impls reference pallas mosaic jax_triton     # decode alternatives (``kernel_ops/decode.py``)
    python benchmark/bench_kernels.py --ops decode_step decode --impls reference pallas \
        --batches 128 --contexts 4096      # the serving op at llama3-8b's heads against the read ceiling
    python benchmark/bench_kernels.py --ops decode_step decode --impls pallas \
        --contexts 2048 4096 --batches 128 256                 # long contexts

The ops are the modules of ``kernel_ops/``, one per op (what a module defines: its ``__init__``).

Each case's implementations are checked on the same inputs (``run_case``), then timed as
``--calls`` back-to-back calls inside one jitted function (``time_calls``), reporting the median
per call, the bytes and FLOPs the op must move (each op's ``make_case``) and their ratios to the card's
copy bandwidth and matmul rate (``--copy-tbps``, ``--matmul-tflops``; the defaults are the H100's
of benchmark/NOTES.md), to the copy this run measures (``--no-copy``: none) and to the read
bandwidth it measures (``read_bandwidth.py``, a read-only reduction of ``--read-gib`` GiB;
``--no-read``: none), the ceiling of an op that reads far more than it writes. One JSON line per
case, after one for each ceiling measured; a failing implementation prints its error and the run
goes on; a table of the results comes last.

The defaults are llama3-8b's attention: 32 query heads, 8 KV heads, head dim 128, bf16 pages of
64 tokens.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from kernel_ops import ops  # noqa: E402
from read_bandwidth import measure_read_tbps  # noqa: E402

OPS = ops()
KERNEL_IMPLS = ('reference', 'pallas', 'pallas_interpret')       # every op's
TOLERANCE = {'float32': 1e-4, 'bfloat16': 2e-2, 'float16': 5e-3}
CEILINGS = ('copy', 'read')      # the measured bandwidths, each its own record


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

TIMERS = {'calls': time_calls, 'in_place': time_in_place_calls, 'chained': time_chained_calls}


def impls_known() -> tuple[str, ...]:
    """Every implementation some op has."""
    return KERNEL_IMPLS + tuple(impl for module in OPS.values() for impl in getattr(module, 'EXTRA_IMPLS', ()))


def run_case(op, args, batch, context, seed, ceilings, results):
    """Check every implementation's first rows against the reference's (relative L2 error, within
    ``TOLERANCE``), then time it (``TIMERS``); emit one record per implementation and config, with
    its ratio to each measured ceiling (``ceilings``: TB/s by name, ``copy`` and ``read``)."""
    module = OPS[op]
    base = dict(op=op, batch=batch, context=context, block_size=args.block_size, dtype=args.dtype,
                heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                ragged=args.ragged, prefix=args.prefix if op == 'prefill' else None,
                hidden=module.row_width(args) if hasattr(module, 'row_width') else None,
                device=str(jax.devices()[0].device_kind),
                jax=jax.__version__)
    try:
        case = module.make_case(args, batch, context, seed)
    except Exception as e:       # noqa: BLE001 - report and go on
        emit(dict(base, impl='-', failed=f'inputs: {type(e).__name__}: {e}'), results)
        return
    reference = None
    try:
        reference = np.asarray(module.check_rows(impls_of_reference(op, args), case).astype(jnp.float32))
    except Exception as e:       # noqa: BLE001
        print(f'# reference check rows failed: {type(e).__name__}: {e}', flush=True)
    for name, variants in module.impls(args).items():
        for config, fn in variants:
            record = dict(base, impl=name, config=None if config is None else vars(config))
            try:
                out = np.asarray(module.check_rows(fn, case).astype(jnp.float32))
                error = relative_error(out, reference) if reference is not None else None
                record['rel_error'] = error
                if error is not None and not error < TOLERANCE[args.dtype]:
                    raise AssertionError(f'wrong result: relative error {error:.3g}')
                median, best = TIMERS[getattr(module, 'TIMER', 'calls')](fn, case, module.call, args)
                record.update(
                    time_us=median * 1e6, best_us=best * 1e6, bytes=case['bytes'],
                    flops=case['flops'], tbps=case['bytes'] / median / 1e12,
                    tflops=case['flops'] / median / 1e12,
                    ratio_to_card_copy=case['bytes'] / median / 1e12 / args.copy_tbps,
                    ratio_to_card_matmul=case['flops'] / median / 1e12 / args.matmul_tflops)
                for name, tbps in ceilings.items():
                    record[f'ratio_to_measured_{name}'] = case['bytes'] / median / 1e12 / tbps
            except Exception as e:   # noqa: BLE001 - a failing implementation must not stop the run
                record['failed'] = f'{type(e).__name__}: {str(e)[:2000]}'
                if args.verbose:
                    traceback.print_exc()
            emit(record, results)
    del case


def impls_of_reference(op, args):
    ref_args = argparse.Namespace(**dict(vars(args), impls=['reference'], sweep=False))
    return OPS[op].impls(ref_args)['reference'][0][1]


def emit(record, results):
    print(json.dumps(record), flush=True)
    results.append(record)


def print_table(results):
    """Decode rates against the copy ceiling (``--copy-tbps``) and the measured read bandwidth
    (``read``; '-' where not measured), prefill rates against the matmul ceiling."""
    print('\n op      impl              batch context   time_us  TB/s|TF/s ratio   read  err      config'
          '\n (kv_write: batch = new tokens; TB/s of the new K/V read and written; (add_)rms_norm: batch = rows)')
    for r in results:
        if r.get('op') in CEILINGS:
            continue
        cfg = r.get('config') or {}
        cfg = ','.join(f'{k}={v}' for k, v in cfg.items()
                       if any(k in sweep for sweep in getattr(OPS.get(r['op']), 'SWEEPS', ())))
        if 'failed' in r:
            print(f" {r['op']:7} {r['impl']:17} {r['batch']:5} {r['context']:7}  FAILED "
                  f"{r['failed'][:80]}")
        else:
            err = r.get('rel_error')
            rate, ratio = ((r['tflops'], r['ratio_to_card_matmul']) if r['op'] == 'prefill'
                           else (r['tbps'], r['ratio_to_card_copy']))
            read = r.get('ratio_to_measured_read')
            print(f" {r['op']:7} {r['impl']:17} {r['batch']:5} {r['context']:7} {r['time_us']:9.1f} "
                  f"{rate:8.3f} {ratio:6.2f} {'-' if read is None else f'{read:6.2f}':>6}  "
                  f"{'-' if err is None else f'{err:.1e}':8} {cfg}")


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
    parser.add_argument('--no-read', action='store_true', help='skip measuring the read bandwidth')
    parser.add_argument('--read-gib', type=float, default=None,
                        help="the read-bandwidth probe's array size (default: read_bandwidth.py's)")
    parser.add_argument('--verbose', action='store_true', help='print tracebacks of failures')
    args = parser.parse_args()
    unknown = set(args.impls) - set(impls_known())
    if unknown:
        parser.error(f'unknown implementations {sorted(unknown)}; known: {impls_known()}')
    windowless = set(args.impls) - set(KERNEL_IMPLS)
    if (args.sliding_window is not None or args.soft_cap is not None) and windowless:
        parser.error(f'{sorted(windowless)} take no --sliding-window or --soft-cap')

    if args.no_read and args.read_gib is not None:
        parser.error('--read-gib sizes the read-bandwidth probe: not with --no-read')

    results = []
    ceilings = {}
    if not args.no_copy:
        ceilings['copy'] = measure_copy_tbps(args)
        emit(dict(op='copy', tbps=ceilings['copy'], device=str(jax.devices()[0].device_kind)), results)
    if not args.no_read:
        probe = measure_read_tbps(args.read_gib)
        ceilings['read'] = probe['tbps']
        emit(dict(op='read', **{k: v for k, v in probe.items() if k != 'device'},
                  device=str(jax.devices()[0].device_kind)), results)
    seeds = itertools.count()
    for op in args.ops:
        cases = ([(n, 0) for n in args.tokens] if getattr(OPS[op], 'ROWS', False)
                 else itertools.product(args.batches, args.contexts))
        for batch, context in cases:
            run_case(op, args, batch, context, next(seeds), ceilings, results)
    print_table(results)


if __name__ == '__main__':
    main()
