#!/usr/bin/env python3
"""Latency across batch sizes and context lengths (LMDeploy's profile_generation).

    python benchmark/profile_generation.py /tmp/llama3-8b --batch-sizes 1 16 64 256 --input-lens 128 2048
    python benchmark/profile_generation.py --batch-sizes 1 4 --input-lens 16 --output-len 8      # CPU smoke run
    python benchmark/profile_generation.py /tmp/llama3-8b --tp 2 --batch-sizes 1 --do-sample    # sampled decode

For each (batch size, input length): first-token latency, decode tok/s per request and in total,
and peak device memory; one ``RESULT {json}`` line each.
"""
from __future__ import annotations

import argparse

import numpy as np

from bench_common import (add_engine_args, build_pipeline, device_description, peak_device_bytes, percentiles,
                          print_result, random_prompt_ids, run_requests)


def measure_generation(pipe, rng: np.random.Generator, batch: int, input_len: int, output_len: int,
                       do_sample: bool = False) -> dict:
    """``batch`` random prompts of ``input_len`` tokens at once, ``output_len`` tokens each (after
    one warm-up request): first-token latency, decode tok/s per request and in total."""
    vocab = pipe.tokenizer.vocab_size
    requests = [(random_prompt_ids(rng, vocab, input_len), output_len) for _ in range(batch)]
    run_requests(pipe, requests[:1], progress=False, session_base=10_000_000, do_sample=do_sample)   # warm path
    timings, seconds = run_requests(pipe, requests, progress=False, do_sample=do_sample)
    per_request = [(t.output_len - 1) / max(t.end - t.first_token, 1e-9) for t in timings]
    return dict(first_token_ms=percentiles([t.ttft for t in timings]),
                decode_tok_per_s_per_request=round(float(np.mean(per_request)), 1),
                total_tok_per_s=round(sum(t.output_len for t in timings) / seconds, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 16, 64, 256])
    parser.add_argument('--input-lens', type=int, nargs='+', default=[128, 2048])
    parser.add_argument('--output-len', type=int, default=256)
    parser.add_argument('--do-sample', action='store_true',
                        help="sample (GenerationConfig's top-k 50, top-p 1.0, temperature 0.8) instead of greedy")
    args = parser.parse_args()

    pipe, startup = build_pipeline(args)
    rng = np.random.default_rng(args.seed)
    print(f'start-up {startup:.1f} s')
    for input_len in args.input_lens:
        for batch in args.batch_sizes:
            record = dict(engine=f'lmdeploy_jax-{args.backend}', bench='generation', device=device_description(),
                          model=args.model_path or 'default', tp=args.tp, batch_size=batch, input_len=input_len,
                          output_len=args.output_len, do_sample=args.do_sample, quant_policy=args.quant_policy,
                          **measure_generation(pipe, rng, batch, input_len, args.output_len, args.do_sample),
                          peak_device_bytes=peak_device_bytes(), startup_s=round(startup, 1))
            print(f'batch {batch:4d} input {input_len:5d}: first token {record["first_token_ms"]["p50"]:9.1f} ms, '
                  f'{record["decode_tok_per_s_per_request"]:8.1f} tok/s per request, '
                  f'{record["total_tok_per_s"]:9.1f} tok/s total')
            print_result(record)
    pipe.close()


if __name__ == '__main__':
    main()
