"""What the benchmark scripts share: engine flags, timed requests, percentiles, result lines.

Requests go through ``AsyncEngine.generate`` with token ids (no chat template) and EOS ignored, as
in LMDeploy's benchmarks, so every engine sees exactly the same number of tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import dataclass

import numpy as np


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model_path', nargs='?', default=None, help='model (default: the embedded SmolLM2-135M)')
    parser.add_argument('--backend', default='turbomind', choices=['turbomind', 'pytorch'])
    parser.add_argument('--dtype', default='auto')
    parser.add_argument('--tp', type=int, default=1)
    parser.add_argument('--ep', type=int, default=1,
                        help="turbomind's split of a mixture of experts (TurbomindEngineConfig.ep): 1 inside each "
                             'expert over the tp devices, tp whole experts a device')
    parser.add_argument('--max-batch-size', type=int, default=256)
    parser.add_argument('--cache-max-entry-count', type=float, default=0.8)
    parser.add_argument('--session-len', type=int, default=4096)
    parser.add_argument('--max-prefill-token-num', type=int, default=8192)
    parser.add_argument('--communicator', default='cuda-ipc', choices=['cuda-ipc', 'nccl'],
                        help="turbomind's tensor-parallel sums (TurbomindEngineConfig.communicator)")
    parser.add_argument('--quant-policy', type=int, default=0, choices=[0, 8, 4],
                        help="turbomind's KV cache quantization (TurbomindEngineConfig.quant_policy)")
    parser.add_argument('--enable-mixed-chunk', action='store_true',
                        help="turbomind's mixed prefill/decode steps (TurbomindEngineConfig.enable_mixed_chunk)")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--log-level', default='WARNING', help="e.g. INFO: start-up phases' times")


def build_pipeline(args: argparse.Namespace):
    """The pipeline and its start-up time (load + compile), in seconds."""
    from lmdeploy_jax import PytorchEngineConfig, TurbomindEngineConfig, pipeline
    if args.backend == 'pytorch' and (args.quant_policy or args.ep != 1):
        raise SystemExit('--quant-policy and --ep are turbomind options')
    if args.backend == 'pytorch' and args.enable_mixed_chunk:
        raise SystemExit('--enable-mixed-chunk is a turbomind option')
    common = dict(dtype=args.dtype, tp=args.tp, session_len=args.session_len, max_batch_size=args.max_batch_size,
                  cache_max_entry_count=args.cache_max_entry_count)
    config = (PytorchEngineConfig(**common) if args.backend == 'pytorch'
              else TurbomindEngineConfig(max_prefill_token_num=args.max_prefill_token_num,
                                         communicator=args.communicator, quant_policy=args.quant_policy,
                                         enable_mixed_chunk=args.enable_mixed_chunk,
                                         ep=args.ep, **common))
    start = time.perf_counter()
    pipe = pipeline(args.model_path, backend=args.backend, backend_config=config, log_level=args.log_level)
    return pipe, time.perf_counter() - start


def random_prompt_ids(rng: np.random.Generator, vocab_size: int, length: int) -> list[int]:
    """Token ids away from the special ids at the bottom of the vocabulary."""
    return rng.integers(16, vocab_size, size=length).tolist()


# The ShareGPT workload's means: vLLM's benchmark_serving.py on 1000 prompts of
# ShareGPT_V3_unfiltered_cleaned_split.json (its default seed; Llama-3.1-8B-Instruct's tokenizer) printed
# "Total input tokens: 215196" and "Total generated tokens: 197090" in vllm-project/vllm pull request
# #15720; other published runs print the same input total and 185671 to 197119 generated tokens (the
# model may stop before the reference reply's length). That script keeps a prompt of 4 to 1024 tokens
# with a reply of at least 4, together at most 2048; both are drawn in [4, 1024] here. No spread is
# published with these figures: lengths are drawn log-normal with SHAREGPT_SIGMA, our assumption, its
# location set so that the mean over the range equals the published mean.
SHAREGPT_INPUT_MEAN = 215.2
SHAREGPT_OUTPUT_MEAN = 197.1
SHAREGPT_RANGE = (4, 1024)
SHAREGPT_SIGMA = 1.0
WORKLOADS = ('fixed', 'sharegpt')


def _truncated_lognormal_mean(mu: float, sigma: float, low: float, high: float) -> float:
    def cdf(x):
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
    a, b = math.log(low), math.log(high)
    inside = cdf((b - mu) / sigma) - cdf((a - mu) / sigma)
    shifted = cdf((b - mu - sigma ** 2) / sigma) - cdf((a - mu - sigma ** 2) / sigma)
    return math.exp(mu + sigma ** 2 / 2) * shifted / inside


def truncated_lognormal_lengths(rng: np.random.Generator, num: int, mean: float, sigma: float = SHAREGPT_SIGMA,
                                low: int = SHAREGPT_RANGE[0], high: int = SHAREGPT_RANGE[1]) -> list[int]:
    """``num`` integer lengths in [low, high] from a log-normal of shape ``sigma`` restricted to that range
    (draws outside are drawn again), whose expected value is ``mean``; ValueError unless low < mean < high."""
    if not low < mean < high:
        raise ValueError(f'mean {mean} is not inside the range [{low}, {high}]')
    lo, hi = math.log(low) - 10 * sigma, math.log(high)
    for _ in range(200):             # bisection on the location: the truncated mean grows with it
        mu = (lo + hi) / 2
        lo, hi = (mu, hi) if _truncated_lognormal_mean(mu, sigma, low, high) < mean else (lo, mu)
    out = np.empty(0, dtype=np.int64)
    while out.size < num:
        draw = np.rint(rng.lognormal(mu, sigma, size=2 * (num - out.size) + 16)).astype(np.int64)
        out = np.concatenate([out, draw[(draw >= low) & (draw <= high)]])
    return out[:num].tolist()


def make_requests(rng: np.random.Generator, vocab_size: int, num: int, workload: str = 'fixed',
                  input_len: int = 512, output_len: int = 256,
                  random_range_ratio: float = 1.0) -> list[tuple[list[int], int]]:
    """``num`` (prompt token ids, output length) pairs, the same for a given generator state in every
    engine. ``fixed``: lengths drawn uniformly from [ratio * len, len] (1.0: exactly ``input_len`` and
    ``output_len``). ``sharegpt``: lengths drawn with ShareGPT's published means (above); the length
    arguments do not apply. ValueError for another workload."""
    if workload == 'sharegpt':
        inputs = truncated_lognormal_lengths(rng, num, SHAREGPT_INPUT_MEAN)
        outputs = truncated_lognormal_lengths(rng, num, SHAREGPT_OUTPUT_MEAN)
        return [(random_prompt_ids(rng, vocab_size, n_in), n_out) for n_in, n_out in zip(inputs, outputs)]
    if workload != 'fixed':
        raise ValueError(f'workload {workload!r}: expected one of {WORKLOADS}')

    def length(n):
        return int(rng.integers(max(1, int(n * random_range_ratio)), n + 1))
    return [(random_prompt_ids(rng, vocab_size, length(input_len)), length(output_len)) for _ in range(num)]


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """--num-prompts, --workload (one or more, run in turn on one engine) and the fixed workload's
    lengths (None where not given: ``workload_kwargs`` fills them in or refuses them)."""
    parser.add_argument('--num-prompts', type=int, default=1000)
    parser.add_argument('--workload', nargs='+', default=['fixed'], choices=WORKLOADS,
                        help='one run per workload, in turn, on one engine. fixed: --input-len / --output-len; '
                             "sharegpt: lengths drawn with ShareGPT's published means (bench_common.py)")
    parser.add_argument('--input-len', type=int, default=None, help='fixed workload (default 512)')
    parser.add_argument('--output-len', type=int, default=None, help='fixed workload (default 256)')
    parser.add_argument('--random-range-ratio', type=float, default=None,
                        help='fixed workload: lengths drawn uniformly from [ratio * len, len]; 1.0 = fixed lengths')


def workload_kwargs(args: argparse.Namespace) -> list[dict]:
    """``make_requests``' keyword arguments for each ``--workload`` (``add_workload_args``' flags);
    SystemExit naming the length flags given without the fixed workload, which alone takes them."""
    lengths = {'input_len': args.input_len, 'output_len': args.output_len,
               'random_range_ratio': args.random_range_ratio}
    given = [f'--{k.replace("_", "-")}' for k, v in lengths.items() if v is not None]
    if given and 'fixed' not in args.workload:
        raise SystemExit(f'{", ".join(given)}: not with --workload sharegpt, which draws its own lengths')
    defaults = {'input_len': 512, 'output_len': 256, 'random_range_ratio': 1.0}
    fixed = {'workload': 'fixed', **{k: defaults[k] if v is None else v for k, v in lengths.items()}}
    return [fixed if name == 'fixed' else {'workload': name} for name in dict.fromkeys(args.workload)]


def workload_fields(workload: dict, requests: list[tuple[list[int], int]]) -> dict:
    """A RESULT record's workload fields: its name, and the fixed workload's configured lengths or the
    mean lengths of ``requests`` (any other workload)."""
    if 'input_len' in workload:
        return {'workload': workload['workload'], 'input_len': workload['input_len'],
                'output_len': workload['output_len']}
    return {'workload': workload['workload'],
            'input_len': round(float(np.mean([len(ids) for ids, _ in requests])), 1),
            'output_len': round(float(np.mean([n for _, n in requests])), 1)}


@dataclass
class RequestTiming:
    input_len: int
    output_len: int
    start: float
    first_token: float
    end: float

    @property
    def ttft(self) -> float:
        return self.first_token - self.start

    @property
    def tpot(self) -> float:
        return (self.end - self.first_token) / max(self.output_len - 1, 1)


async def timed_request(pipe, session_id: int, input_ids: list[int], output_len: int,
                        do_sample: bool = False, response_format: dict | None = None) -> RequestTiming:
    """One request; ``do_sample`` samples with ``GenerationConfig``'s defaults (top-k 50, top-p 1.0,
    temperature 0.8) instead of decoding greedily; ``response_format`` guides it."""
    from lmdeploy_jax import GenerationConfig
    config = GenerationConfig(max_new_tokens=output_len, ignore_eos=True, do_sample=do_sample,
                              response_format=response_format)
    start = time.perf_counter()
    first = None
    async for out in pipe.generate(None, session_id, config, stream_response=False, input_ids=input_ids,
                                   do_preprocess=False):
        if first is None and out.token_ids:
            first = time.perf_counter()
        if out.finish_reason == 'error':
            raise RuntimeError(out.response)
    end = time.perf_counter()
    return RequestTiming(len(input_ids), out.generate_token_len, start, first or end, end)


def run_requests(pipe, requests: list[tuple[list[int], int]], progress: bool = True,
                 session_base: int = 1_000_000, do_sample: bool = False,
                 response_formats: list[dict | None] | None = None) -> tuple[list[RequestTiming], float]:
    """Submit all requests at once (the engine batches them); timings and wall seconds.
    ``response_formats``: one per request (None: unguided), for guided decoding."""
    from tqdm import tqdm

    async def run_all():
        bar = tqdm(total=len(requests), disable=not progress or len(requests) < 32, desc='requests')

        async def one(i, ids, n):
            timing = await timed_request(pipe, session_base + i, ids, n, do_sample,
                                         response_formats[i] if response_formats else None)
            bar.update(1)
            return timing
        try:
            return await asyncio.gather(*(one(i, ids, n) for i, (ids, n) in enumerate(requests)))
        finally:
            bar.close()
    start = time.perf_counter()
    timings = pipe._loop.run(run_all())
    return timings, time.perf_counter() - start


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean / p50 / p99 of values, in milliseconds by default."""
    arr = np.asarray(values, dtype=np.float64) * scale
    return {'mean': round(float(arr.mean()), 3), 'p50': round(float(np.percentile(arr, 50)), 3),
            'p99': round(float(np.percentile(arr, 99)), 3)}


def print_result(record: dict) -> None:
    print('RESULT ' + json.dumps(record), flush=True)


def device_description() -> str:
    import jax
    device = jax.devices()[0]
    return f'{device.platform}:{getattr(device, "device_kind", "?")}'


def peak_device_bytes() -> int | None:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get('peak_bytes_in_use')
