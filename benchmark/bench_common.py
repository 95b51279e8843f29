"""What the benchmark scripts share: engine flags, timed requests, percentiles, result lines.

Requests go through ``AsyncEngine.generate`` with token ids (no chat template) and EOS ignored, as
in LMDeploy's benchmarks, so every engine sees exactly the same number of tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass

import numpy as np


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model_path', nargs='?', default=None, help='model (default: the embedded SmolLM2-135M)')
    parser.add_argument('--backend', default='turbomind', choices=['turbomind', 'pytorch'])
    parser.add_argument('--dtype', default='auto')
    parser.add_argument('--tp', type=int, default=1)
    parser.add_argument('--max-batch-size', type=int, default=256)
    parser.add_argument('--cache-max-entry-count', type=float, default=0.8)
    parser.add_argument('--session-len', type=int, default=4096)
    parser.add_argument('--max-prefill-token-num', type=int, default=8192)
    parser.add_argument('--communicator', default='cuda-ipc', choices=['cuda-ipc', 'nccl'],
                        help="turbomind's tensor-parallel sums (TurbomindEngineConfig.communicator)")
    parser.add_argument('--quant-policy', type=int, default=0, choices=[0, 8, 4],
                        help="turbomind's KV cache quantization (TurbomindEngineConfig.quant_policy)")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--log-level', default='WARNING', help="e.g. INFO: start-up phases' times")


def build_pipeline(args: argparse.Namespace):
    """The pipeline and its start-up time (load + compile), in seconds."""
    from lmdeploy_jax import PytorchEngineConfig, TurbomindEngineConfig, pipeline
    if args.backend == 'pytorch' and args.quant_policy:
        raise SystemExit('--quant-policy is a turbomind option')
    common = dict(dtype=args.dtype, tp=args.tp, session_len=args.session_len, max_batch_size=args.max_batch_size,
                  cache_max_entry_count=args.cache_max_entry_count)
    config = (PytorchEngineConfig(**common) if args.backend == 'pytorch'
              else TurbomindEngineConfig(max_prefill_token_num=args.max_prefill_token_num,
                                         communicator=args.communicator, quant_policy=args.quant_policy,
                                         **common))
    start = time.perf_counter()
    pipe = pipeline(args.model_path, backend=args.backend, backend_config=config, log_level=args.log_level)
    return pipe, time.perf_counter() - start


def random_prompt_ids(rng: np.random.Generator, vocab_size: int, length: int) -> list[int]:
    """Token ids away from the special ids at the bottom of the vocabulary."""
    return rng.integers(16, vocab_size, size=length).tolist()


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
                        do_sample: bool = False) -> RequestTiming:
    """One request; ``do_sample`` samples with ``GenerationConfig``'s defaults (top-k 50, top-p 1.0,
    temperature 0.8) instead of decoding greedily."""
    from lmdeploy_jax import GenerationConfig
    config = GenerationConfig(max_new_tokens=output_len, ignore_eos=True, do_sample=do_sample)
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
                 session_base: int = 1_000_000, do_sample: bool = False) -> tuple[list[RequestTiming], float]:
    """Submit all requests at once (the engine batches them); timings and wall seconds."""
    from tqdm import tqdm

    async def run_all():
        bar = tqdm(total=len(requests), disable=not progress or len(requests) < 32, desc='requests')

        async def one(i, ids, n):
            timing = await timed_request(pipe, session_base + i, ids, n, do_sample)
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
