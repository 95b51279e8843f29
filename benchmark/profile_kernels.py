#!/usr/bin/env python3
"""Where a decode call's device time goes: a JAX profiler trace of real requests, summed per kernel.

For each ``--batch-sizes`` entry, runs that many requests (``--input-len`` in, ``--output-len``
out, EOS ignored) once to warm up, then again under ``jax.profiler.trace``, and prints, per GPU
stream and per XLA module, the kernels with the most device time (count, total, mean) and the
device time per generated token. GPU only: on a CPU the trace has no device plane.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import tempfile

import numpy as np

from bench_common import add_engine_args, build_pipeline, random_prompt_ids, run_requests


def _module_of(event) -> str:
    """The XLA module (executable) a kernel event belongs to, where the trace says."""
    for key, value in event.stats:
        if key in ('hlo_module', 'hlo_module_name'):
            return str(value)
    return ''


def summarize(trace_dir: str, top: int) -> dict:
    """{'plane line [module]': {'busy_us', 'top': [(kernel, count, total_us), ...]}} for the GPU
    planes of the trace in ``trace_dir``, kernels grouped by the XLA module that ran them (so a
    prefill step's kernels and a decode call's are apart)."""
    from jax.profiler import ProfileData
    path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))[-1]
    data = ProfileData.from_file(path)
    groups = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0.0]))
    for plane in data.planes:
        if not plane.name.startswith('/device:GPU'):
            continue
        for line in plane.lines:
            for event in line.events:
                entry = groups[f'{plane.name} {line.name} [{_module_of(event)}]'][event.name]
                entry[0] += 1
                entry[1] += event.duration_ns / 1e3
    out = {}
    for group, totals in groups.items():
        ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])
        out[group] = {'busy_us': sum(t for _, (_, t) in ranked),
                      'top': [(name[:110], n, round(t, 1)) for name, (n, t) in ranked[:top]]}
    return out


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
            lines = summarize(trace_dir, args.top)
        tokens = batch * args.output_len
        print(f'== batch {batch}: {wall:.3f} s wall for {tokens} tokens ({tokens / wall:.1f} tok/s)')
        for name, line in lines.items():
            if not line['top']:
                continue
            print(f'-- {name}: busy {line["busy_us"] / 1e3:.1f} ms '
                  f'({line["busy_us"] / args.output_len:.1f} us per decode step)')
            for kernel, n, total in line['top']:
                print(f'   {total:10.1f} us {n:6d}x {total / n:8.1f} us  {kernel}')
    pipe.close()


if __name__ == '__main__':
    main()
