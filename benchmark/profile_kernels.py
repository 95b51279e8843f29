#!/usr/bin/env python3
"""Where a decode call's device time goes: a JAX profiler trace of real requests, summed per kernel.

For each ``--batch-sizes`` entry, runs that many requests (``--input-len`` in, ``--output-len``
out, EOS ignored) once to warm up, then again under ``jax.profiler.trace``, and prints, per GPU
stream and per XLA module, the kernels with the most device time (count, total, mean) and the
device time per generated token, then the device's idle gaps and the host threads' busiest
events (``trace_summary.py``). GPU only: on a CPU the trace has no device plane.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

import trace_summary
from bench_common import add_engine_args, build_pipeline, random_prompt_ids, run_requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 256])
    parser.add_argument('--input-len', type=int, default=128)
    parser.add_argument('--output-len', type=int, default=64)
    parser.add_argument('--top', type=int, default=25)
    args = parser.parse_args()
    import jax
    pipe, startup = build_pipeline(args)
    print(json.dumps({'startup_s': round(startup, 2)}), flush=True)
    rng = np.random.default_rng(args.seed)
    vocab = pipe.tokenizer.vocab_size
    for batch in args.batch_sizes:
        requests = [(random_prompt_ids(rng, vocab, args.input_len), args.output_len) for _ in range(batch)]
        run_requests(pipe, requests, progress=False)
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                _, wall = run_requests(pipe, requests, progress=False)
            data = trace_summary.load(trace_dir)
        lines = trace_summary.kernel_totals(data, args.top)
        tokens = batch * args.output_len
        print(f'== batch {batch}: {wall:.3f} s wall for {tokens} tokens ({tokens / wall:.1f} tok/s)')
        for name, line in lines.items():
            if not line['top']:
                continue
            print(f'-- {name}: busy {line["busy_us"] / 1e3:.1f} ms '
                  f'({line["busy_us"] / args.output_len:.1f} us per decode step)')
            for kernel, n, total in line['top']:
                print(f'   {total:10.1f} us {n:6d}x {total / n:8.1f} us  {kernel}')
        trace_summary.print_gaps_and_threads(data)
    pipe.close()


if __name__ == '__main__':
    main()
