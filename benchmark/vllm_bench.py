#!/usr/bin/env python3
"""vLLM's offline engine (``vllm.LLM``, its defaults) on the workload of ``profile_throughput.py``:
the same requests as token ids (``bench_common.make_requests``, same seed and tokenizer size) for
each ``--workload`` in turn on one engine, EOS ignored, greedy; then one request of 128 tokens in,
256 out, as ``lmdeploy_bench.py`` measures batch 1.

    export PYTHONPATH=/tmp/vllm-site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
    python3 benchmark/vllm_bench.py /tmp/llama3-8b --num-prompts 1000 --input-len 512 --output-len 256
    python3 benchmark/vllm_bench.py /tmp/llama3-8b --workload fixed sharegpt

Prints one ``RESULT {json}`` line per measurement (``compare_results.py`` reads them). Needs vLLM
importable (prepare_vllm.sh, vllm_carry_step.sh on the GPU machine); the FlashInfer sampler off where
FlashInfer is not installed (prepare_vllm.sh leaves it out; greedy decoding never runs it).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from bench_common import add_workload_args, make_requests, print_result, workload_fields, workload_kwargs

BATCH1_INPUT_LEN, BATCH1_OUTPUT_LEN = 128, 256


def generate(llm, requests: list[tuple[list[int], int]]) -> tuple[int, int, float]:
    """Run ``requests`` as one ``llm.generate`` call: (prompt tokens, output tokens, seconds)."""
    from vllm import SamplingParams
    prompts = [{'prompt_token_ids': ids} for ids, _ in requests]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for _, n in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    return sum(len(o.prompt_token_ids) for o in outputs), n_out, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model_path')
    add_workload_args(parser)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--warmup', type=int, default=8, help='requests run before timing')
    args = parser.parse_args()
    workloads = workload_kwargs(args)

    import torch
    import vllm
    start = time.perf_counter()
    llm = vllm.LLM(model=args.model_path, seed=args.seed)
    startup = time.perf_counter() - start
    vocab = len(llm.get_tokenizer())
    engine = f'vllm-{vllm.__version__}'
    device = f'cuda:{torch.cuda.get_device_name()}'
    for workload in workloads:
        requests = make_requests(np.random.default_rng(args.seed), vocab, args.num_prompts, **workload)
        if args.warmup:
            generate(llm, requests[:args.warmup])
        n_in, n_out, seconds = generate(llm, requests)
        print_result(dict(engine=engine, bench='throughput', device=device, model=args.model_path,
                          num_prompts=len(requests), **workload_fields(workload, requests),
                          seconds=round(seconds, 2), req_per_s=round(len(requests) / seconds, 2),
                          input_tok_per_s=round(n_in / seconds, 1), output_tok_per_s=round(n_out / seconds, 1),
                          total_tok_per_s=round((n_in + n_out) / seconds, 1), startup_s=round(startup, 1)))
    batch1(llm, vocab, args.seed, engine, device, args.model_path)


def batch1(llm, vocab: int, seed: int, engine: str, device: str, model: str) -> None:
    """One request of BATCH1_INPUT_LEN tokens in, BATCH1_OUTPUT_LEN out, timed on its second run."""
    one = make_requests(np.random.default_rng(seed + 1), vocab, 1, input_len=BATCH1_INPUT_LEN,
                        output_len=BATCH1_OUTPUT_LEN)
    generate(llm, one)
    _, n_out, seconds = generate(llm, one)
    print_result(dict(engine=engine, bench='batch1', device=device, model=model,
                      input_len=BATCH1_INPUT_LEN, output_len=n_out, seconds=round(seconds, 3),
                      output_tok_per_s=round(n_out / seconds, 1)))


if __name__ == '__main__':
    main()
