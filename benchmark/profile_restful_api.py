#!/usr/bin/env python
"""Load a running OpenAI-compatible server (ours, ``vllm serve``, LMDeploy's) with many streaming
clients; measure what users feel.

Requests arrive at each of the ``--request-rate`` rates in turn (Poisson arrivals, the same seeded
schedule shape at every rate; ``inf``: all at once), at most ``--concurrency`` in flight. Each is a
random prompt of ``--input-len`` words asking for ``--output-len`` tokens, or, with ``--workload
sharegpt``, of lengths drawn with ShareGPT's published means (``bench_common.py``). Reported, one
JSON line per rate (on stdout and appended to ``--output``): time to first token (TTFT), time per
output token after the first (TPOT), inter-token latency (ITL, between streamed chunks) and
end-to-end latency as mean/p50/p90/p99 in ms, and request, output-token and total-token throughput.

    lmdeploy_jax serve api_server --backend pytorch &
    python benchmark/profile_restful_api.py --num-prompts 32 --concurrency 8 --output-len 16
    python benchmark/profile_restful_api.py --base-url http://127.0.0.1:8000 --endpoint completions \
        --request-rate 4 16 64 --num-prompts 500 --workload sharegpt --ignore-eos
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from bench_common import SHAREGPT_INPUT_MEAN, SHAREGPT_OUTPUT_MEAN, WORKLOADS, truncated_lognormal_lengths

WORDS = ('time year people way day man thing woman life child world school state family student group country '
         'problem hand part place case week company system program question work government number night point '
         'home water room mother area money story fact month lot right study book eye job word business issue').split()


@dataclass
class Outcome:
    ok: bool
    start: float = 0.0
    chunk_times: list[float] = field(default_factory=list)   # arrival of each chunk with text
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ''


def make_prompts(n: int, input_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f'{i}: ' + ' '.join(rng.choice(WORDS) for _ in range(input_len)) for i in range(n)]


def make_workload(args) -> list[tuple[str, int]]:
    """(prompt, max_tokens) per request: ``--input-len`` words and ``--output-len`` tokens, or ShareGPT's
    lengths (input in words) drawn from ``--seed``."""
    if args.workload == 'fixed':
        return [(p, args.output_len) for p in make_prompts(args.num_prompts, args.input_len, args.seed)]
    rng = np.random.default_rng(args.seed)
    inputs = truncated_lognormal_lengths(rng, args.num_prompts, SHAREGPT_INPUT_MEAN)
    outputs = truncated_lognormal_lengths(rng, args.num_prompts, SHAREGPT_OUTPUT_MEAN)
    words = random.Random(args.seed)
    return [(f'{i}: ' + ' '.join(words.choice(WORDS) for _ in range(n_in)), n_out)
            for i, (n_in, n_out) in enumerate(zip(inputs, outputs))]


def poisson_schedule(num: int, rate: float, seed: int) -> list[float]:
    """Arrival times in seconds from the start of ``num`` requests of a Poisson process of ``rate`` per
    second (exponential gaps, the first at 0); all 0 for an infinite rate. ValueError for a rate <= 0."""
    if not rate > 0:
        raise ValueError(f'request rate {rate}: must be > 0')
    if rate == float('inf'):
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


async def one_request(client: httpx.AsyncClient, args, prompt: str, max_tokens: int) -> Outcome:
    body = {'model': args.model, 'max_tokens': max_tokens, 'temperature': args.temperature, 'stream': True,
            'stream_options': {'include_usage': True}, 'ignore_eos': args.ignore_eos}
    if args.endpoint == 'chat':
        path, body['messages'] = '/v1/chat/completions', [{'role': 'user', 'content': prompt}]
    else:
        path, body['prompt'] = '/v1/completions', prompt
    out = Outcome(ok=False, start=time.perf_counter())
    try:
        async with client.stream('POST', path, json=body) as r:
            if r.status_code != 200:
                out.error = f'HTTP {r.status_code}: {(await r.aread())[:200]!r}'
                return out
            async for line in r.aiter_lines():
                if not line.startswith('data: ') or line == 'data: [DONE]':
                    continue
                chunk = json.loads(line[6:])
                if 'error' in chunk:
                    out.error = chunk['error']['message']
                    return out
                if chunk.get('usage'):
                    usage = chunk['usage']
                    out.prompt_tokens, out.output_tokens = usage['prompt_tokens'], usage['completion_tokens']
                for choice in chunk.get('choices', []):
                    if (choice.get('delta') or {}).get('content') or choice.get('text'):
                        out.chunk_times.append(time.perf_counter())
        out.ok = bool(out.chunk_times)
        out.error = '' if out.ok else 'no text came back'
    except httpx.HTTPError as e:
        out.error = f'{type(e).__name__}: {e}'
    return out


async def run_load(args, requests: list[tuple[str, int]], rate: float) -> tuple[list[Outcome], float]:
    """Send ``requests`` on ``poisson_schedule`` at ``rate``; their outcomes and the wall seconds."""
    headers = {'Authorization': f'Bearer {args.api_key}'} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency or len(requests))
    gate = asyncio.Semaphore(args.concurrency or len(requests))
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=args.timeout) as client:
        async def gated(prompt, max_tokens):
            async with gate:
                return await one_request(client, args, prompt, max_tokens)
        start, tasks = time.perf_counter(), []
        for (prompt, max_tokens), at in zip(requests, poisson_schedule(len(requests), rate, args.seed)):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(gated(prompt, max_tokens)))
        outcomes = await asyncio.gather(*tasks)
    return outcomes, time.perf_counter() - start


def _summary(values_s: list[float]) -> dict:
    if not values_s:
        return {}
    ms = np.asarray(values_s) * 1000
    percentiles = {f'p{q}': round(float(np.percentile(ms, q)), 3) for q in (50, 90, 99)}
    return {'mean': round(float(ms.mean()), 3), **percentiles}


def report(args, outcomes: list[Outcome], duration: float, rate: float, max_tokens: list[int]) -> dict:
    done = [o for o in outcomes if o.ok]
    ttft = [o.chunk_times[0] - o.start for o in done]
    tpot = [(o.chunk_times[-1] - o.chunk_times[0]) / (o.output_tokens - 1) for o in done if o.output_tokens > 1]
    itl = [b - a for o in done for a, b in zip(o.chunk_times, o.chunk_times[1:])]
    output_tokens = sum(o.output_tokens for o in done)
    return {
        'engine': args.engine, 'endpoint': args.endpoint, 'num_prompts': len(outcomes), 'completed': len(done),
        'failed': len(outcomes) - len(done), 'first_error': next((o.error for o in outcomes if not o.ok), None),
        'request_rate': None if rate == float('inf') else rate, 'workload': args.workload,
        'concurrency': args.concurrency, 'input_len_words': args.input_len if args.workload == 'fixed' else None,
        'output_len': round(float(np.mean(max_tokens)), 1),
        'duration_s': round(duration, 3), 'request_throughput': round(len(done) / duration, 3),
        'output_throughput': round(output_tokens / duration, 3),
        'total_token_throughput': round((output_tokens + sum(o.prompt_tokens for o in done)) / duration, 3),
        'prompt_tokens': sum(o.prompt_tokens for o in done), 'output_tokens': output_tokens,
        'ttft_ms': _summary(ttft), 'tpot_ms': _summary(tpot), 'itl_ms': _summary(itl),
        'e2e_latency_ms': _summary([o.chunk_times[-1] - o.start for o in done]),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--base-url', default='http://127.0.0.1:23333')
    p.add_argument('--model', default=None, help="default: the server's first model")
    p.add_argument('--api-key', default=None)
    p.add_argument('--endpoint', choices=['chat', 'completions'], default='chat')
    p.add_argument('--num-prompts', type=int, default=100)
    p.add_argument('--request-rate', type=float, nargs='+', default=[float('inf')],
                   help='requests/s (Poisson), one run per rate; inf: all at once')
    p.add_argument('--concurrency', type=int, default=None, help='most requests in flight')
    p.add_argument('--workload', choices=WORKLOADS, default='fixed',
                   help="fixed: --input-len / --output-len; sharegpt: ShareGPT's lengths (bench_common.py)")
    p.add_argument('--input-len', type=int, default=None, help='prompt length in words (fixed workload; 32)')
    p.add_argument('--output-len', type=int, default=None, help='max_tokens of each request (fixed workload; 64)')
    p.add_argument('--ignore-eos', action='store_true', help='generate exactly --output-len tokens')
    p.add_argument('--temperature', type=float, default=0.0)
    p.add_argument('--timeout', type=float, default=600.0, help='seconds per request')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--warmup', type=int, default=0,
                   help='send the first N requests all at once before the timed runs, unreported')
    p.add_argument('--output', default=None, help='append the JSON line to this file too')
    p.add_argument('--engine', default=None, help="the server's name in each line's 'engine' field, for "
                   "compare_results.py's serving table (e.g. lmdeploy_jax, vllm)")
    args = p.parse_args(argv)
    if any(not rate > 0 for rate in args.request_rate):
        p.error(f'--request-rate {args.request_rate}: every rate must be > 0')
    if args.workload == 'sharegpt':
        if args.input_len is not None or args.output_len is not None:
            p.error('--input-len / --output-len: not with --workload sharegpt, which draws its own lengths')
    else:
        args.input_len = 32 if args.input_len is None else args.input_len
        args.output_len = 64 if args.output_len is None else args.output_len
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    headers = {'Authorization': f'Bearer {args.api_key}'} if args.api_key else {}
    if args.model is None:
        args.model = httpx.get(f'{args.base_url}/v1/models', headers=headers, timeout=30).json()['data'][0]['id']
    requests = make_workload(args)
    all_ok = True
    if args.warmup:
        outcomes, _ = asyncio.run(run_load(args, requests[:args.warmup], float('inf')))
        all_ok &= all(o.ok for o in outcomes)
    for rate in args.request_rate:
        outcomes, duration = asyncio.run(run_load(args, requests, rate))
        all_ok &= all(o.ok for o in outcomes)
        line = json.dumps(report(args, outcomes, duration, rate, [n for _, n in requests]))
        print(line, flush=True)
        if args.output:
            with open(args.output, 'a') as f:
                f.write(line + '\n')
    return 0 if all_ok else 1


if __name__ == '__main__':
    sys.exit(main())
