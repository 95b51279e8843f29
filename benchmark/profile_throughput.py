#!/usr/bin/env python3
"""Offline throughput (LMDeploy's profile_throughput): N requests at once, EOS ignored.

    python benchmark/profile_throughput.py /tmp/llama3-8b --num-prompts 1000 --input-len 512 --output-len 256
    python benchmark/profile_throughput.py --num-prompts 8 --input-len 32 --output-len 16     # CPU smoke run
    python benchmark/profile_throughput.py MODEL --workload sharegpt     # ShareGPT's lengths (bench_common.py)
    python benchmark/profile_throughput.py MODEL --dataset ShareGPT_V3_unfiltered_cleaned_split.json

Reports req/s, input and output tok/s, TTFT and TPOT (mean/p50/p99, ms) and start-up time, and
prints one ``RESULT {json}`` line per run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile

import numpy as np

from bench_common import (add_engine_args, add_workload_args, build_pipeline, device_description, make_requests,
                          percentiles, print_result, run_requests, workload_fields, workload_kwargs)


def sharegpt_requests(path: str, tokenizer, num: int, rng: np.random.Generator, max_len: int):
    """(prompt ids, output length) pairs from a ShareGPT file: first human turn in, first reply's length out."""
    with open(path) as f:
        data = json.load(f)
    pairs = []
    for item in rng.permutation(len(data)):
        turns = data[item].get('conversations', [])
        if len(turns) < 2:
            continue
        ids = tokenizer.encode(turns[0]['value'])
        out_len = len(tokenizer.encode(turns[1]['value'], add_bos=False))
        if 4 <= len(ids) and 4 <= out_len and len(ids) + out_len <= max_len:
            pairs.append((ids, out_len))
        if len(pairs) == num:
            break
    return pairs


def _engine_stats(pipe) -> dict:
    """The engine's counters, where it keeps them (the JAX engine: calls, chained calls, seconds
    blocked on results; the wall time minus the latter is the engine thread's host work)."""
    stats = getattr(pipe.engine, 'stats', None)
    return stats() if stats is not None else {}


def _pool_tokens(engine) -> int | None:
    """Tokens the JAX engine's KV pool holds (None for the pytorch backend)."""
    scheduler = getattr(engine, '_scheduler', None)
    return engine.num_total_blocks() * scheduler.blocks.block_size if scheduler is not None else None


def _traced(trace_dir: str):
    import jax
    return jax.profiler.trace(trace_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    add_workload_args(parser)
    parser.add_argument('--dataset', default=None, help='a ShareGPT-format JSON file instead of random prompts')
    parser.add_argument('--warmup', type=int, default=8, help='requests run before timing')
    parser.add_argument('--trace', nargs='?', const='', default=None, metavar='DIR',
                        help='run the timed requests under jax.profiler and print the device idle gaps and '
                             'the host threads (trace_summary.py); the figures then include the tracing cost. '
                             'With DIR the trace is kept there (trace_summary.py DIR reads it again)')
    args = parser.parse_args()

    lengths_given = {args.input_len, args.output_len, args.random_range_ratio} != {None}
    if args.dataset and (args.workload != ['fixed'] or lengths_given):
        raise SystemExit('--dataset takes its lengths from the file: not with --workload, --input-len, --output-len '
                         'or --random-range-ratio')
    if args.trace and len(args.workload) > 1:
        raise SystemExit('--trace DIR keeps one trace: give one --workload')
    workloads = [{'workload': 'dataset'}] if args.dataset else workload_kwargs(args)
    pipe, startup = build_pipeline(args)
    for workload in workloads:
        rng = np.random.default_rng(args.seed)
        if args.dataset:
            requests = sharegpt_requests(args.dataset, pipe.tokenizer, args.num_prompts, rng, args.session_len)
        else:
            requests = make_requests(rng, pipe.tokenizer.vocab_size, args.num_prompts, **workload)
        record = measure(pipe, args, requests, workload_fields(workload, requests))
        record['startup_s'] = round(startup, 1)
        print(f"{record['workload']}: {record['req_per_s']} req/s, {record['output_tok_per_s']} output tok/s, "
              f"TTFT p50 {record['ttft_ms']['p50']} ms, TPOT p50 {record['tpot_ms']['p50']} ms, "
              f"start-up {startup:.1f} s")
        print_result(record)
    pipe.close()


def measure(pipe, args: argparse.Namespace, requests: list[tuple[list[int], int]], fields: dict) -> dict:
    """Warm up on the first ``--warmup`` requests, then time all of them at once (under the profiler
    with ``--trace``); the RESULT record, ``fields`` (the workload's) included, start-up time excluded."""
    if args.warmup:
        run_requests(pipe, requests[:args.warmup], progress=False, session_base=10_000_000)
    before = _engine_stats(pipe)
    traced = args.trace is not None
    with contextlib.nullcontext(args.trace) if args.trace else tempfile.TemporaryDirectory() as trace_dir:
        with _traced(trace_dir) if traced else contextlib.nullcontext():
            timings, seconds = run_requests(pipe, requests)
        if traced:
            import trace_summary
            trace_summary.print_gaps_and_threads(trace_summary.load(trace_dir))
    after = _engine_stats(pipe)
    n_in = sum(t.input_len for t in timings)
    n_out = sum(t.output_len for t in timings)
    return dict(engine=f'lmdeploy_jax-{args.backend}', bench='throughput', device=device_description(),
                model=args.model_path or 'default', tp=args.tp, ep=args.ep, num_prompts=len(timings), **fields,
                max_batch_size=args.max_batch_size, seconds=round(seconds, 2),
                req_per_s=round(len(timings) / seconds, 2), input_tok_per_s=round(n_in / seconds, 1),
                output_tok_per_s=round(n_out / seconds, 1), total_tok_per_s=round((n_in + n_out) / seconds, 1),
                ttft_ms=percentiles([t.ttft for t in timings]), tpot_ms=percentiles([t.tpot for t in timings]),
                traced=traced, quant_policy=args.quant_policy, enable_mixed_chunk=args.enable_mixed_chunk,
                kv_pool_tokens=_pool_tokens(pipe.engine),
                engine_counters={k: round(after[k] - before[k], 3)
                                 for k in ('calls', 'chained_calls', 'mixed_steps', 'schedule_s', 'dispatch_s',
                                           'result_wait_s', 'complete_s')
                                 if k in after})


if __name__ == '__main__':
    main()
