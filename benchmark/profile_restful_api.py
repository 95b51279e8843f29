#!/usr/bin/env python
"""Load a running OpenAI-compatible server with many streaming clients; measure what users feel.

Requests are sent at a fixed rate (Poisson arrivals, ``--request-rate``) or as fast as
``--concurrency`` clients allow, each a random prompt of ``--input-len`` words asking for
``--output-len`` tokens. Reported (one JSON line per run, on stdout and appended to ``--output``):
time to first token (TTFT), time per output token after the first (TPOT), inter-token latency
(ITL, between streamed chunks) and end-to-end latency as mean/p50/p90/p99 in ms, and
request, output-token and total-token throughput.

    lmdeploy_jax serve api_server --backend pytorch &
    python benchmark/profile_restful_api.py --num-prompts 32 --concurrency 8 --output-len 16
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


async def one_request(client: httpx.AsyncClient, args, prompt: str) -> Outcome:
    body = {'model': args.model, 'max_tokens': args.output_len, 'temperature': args.temperature, 'stream': True,
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


async def run_load(args, prompts: list[str]) -> tuple[list[Outcome], float]:
    headers = {'Authorization': f'Bearer {args.api_key}'} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency or len(prompts))
    gate = asyncio.Semaphore(args.concurrency or len(prompts))
    rng = np.random.default_rng(args.seed)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=args.timeout) as client:
        async def gated(prompt):
            async with gate:
                return await one_request(client, args, prompt)
        start, tasks = time.perf_counter(), []
        for prompt in prompts:
            tasks.append(asyncio.create_task(gated(prompt)))
            if args.request_rate != float('inf'):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        outcomes = await asyncio.gather(*tasks)
    return outcomes, time.perf_counter() - start


def _summary(values_s: list[float]) -> dict:
    if not values_s:
        return {}
    ms = np.asarray(values_s) * 1000
    percentiles = {f'p{q}': round(float(np.percentile(ms, q)), 3) for q in (50, 90, 99)}
    return {'mean': round(float(ms.mean()), 3), **percentiles}


def report(args, outcomes: list[Outcome], duration: float) -> dict:
    done = [o for o in outcomes if o.ok]
    ttft = [o.chunk_times[0] - o.start for o in done]
    tpot = [(o.chunk_times[-1] - o.chunk_times[0]) / (o.output_tokens - 1) for o in done if o.output_tokens > 1]
    itl = [b - a for o in done for a, b in zip(o.chunk_times, o.chunk_times[1:])]
    output_tokens = sum(o.output_tokens for o in done)
    return {
        'endpoint': args.endpoint, 'num_prompts': len(outcomes), 'completed': len(done),
        'failed': len(outcomes) - len(done), 'first_error': next((o.error for o in outcomes if not o.ok), None),
        'request_rate': None if args.request_rate == float('inf') else args.request_rate,
        'concurrency': args.concurrency, 'input_len_words': args.input_len, 'output_len': args.output_len,
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
    p.add_argument('--request-rate', type=float, default=float('inf'), help='requests/s (Poisson); inf: all at once')
    p.add_argument('--concurrency', type=int, default=None, help='most requests in flight')
    p.add_argument('--input-len', type=int, default=32, help='prompt length in words')
    p.add_argument('--output-len', type=int, default=64, help='max_tokens of each request')
    p.add_argument('--ignore-eos', action='store_true', help='generate exactly --output-len tokens')
    p.add_argument('--temperature', type=float, default=0.0)
    p.add_argument('--timeout', type=float, default=600.0, help='seconds per request')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--output', default=None, help='append the JSON line to this file too')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    headers = {'Authorization': f'Bearer {args.api_key}'} if args.api_key else {}
    if args.model is None:
        args.model = httpx.get(f'{args.base_url}/v1/models', headers=headers, timeout=30).json()['data'][0]['id']
    outcomes, duration = asyncio.run(run_load(args, make_prompts(args.num_prompts, args.input_len, args.seed)))
    line = json.dumps(report(args, outcomes, duration))
    print(line, flush=True)
    if args.output:
        with open(args.output, 'a') as f:
            f.write(line + '\n')
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == '__main__':
    sys.exit(main())
