"""A bounded soak of the OpenAI-compatible server: minutes of mixed traffic, then a verdict.

    .venv/bin/python benchmark/soak.py --minutes 30            # starts a server (prefix caching on)
    .venv/bin/python benchmark/soak.py --url http://host:23333 --pid 1234 --minutes 5

Workers send, until the time is up: chat and text completions and ``/generate`` (each streamed and
not), two-turn interactive sessions, greedy questions with a known answer, streams the client
drops mid-way, ``/generate`` streams cancelled by their own session id, chats behind two shared
long system prompts (prefix reuse) and bad requests (invalid fields, lone surrogates, oversize
bodies and prompts, unknown models, broken JSON, an empty raw prompt in a stream). When the
traffic has drained, it compares the KV blocks in use with the idle count before the traffic
and reports how much the engine's counters grew (both from ``/metrics``), and, when it knows the
server's pid, the server's RSS over time (``/proc/<pid>/status``). It prints a summary and the
JSON report (``--output`` writes it to a file) and exits 1 if any KV block leaked, any request
was lost, any answer was a server error (a 5xx, an error event in a stream, a stream cut short)
or unexpected; 0 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from soak_report import (DISCONNECTED, EXPECTED_4XX, LOST, OK, SERVER_ERROR, UNEXPECTED, Tally,  # noqa: E402
                         human_summary, rss_summary, verdict)
from soak_server import engine_counts, kv_used, rss_mib, started_server, wait_idle  # noqa: E402

FRANCE = 'What is the capital of France?'
TOPICS = ['the sea', 'a bicycle', 'prime numbers', 'the moon', 'bread', 'a violin', 'autumn', 'chess']
STYLES = ('briefly and politely', 'in one plain sentence')
OVERSIZE_BYTES = 9 << 20          # over the server's default 8 MiB body limit
OVER_SESSION_WORDS = 20000        # a prompt over the default model's 8192-token session
LONE_SURROGATES = ('\ud800', '\udfff', '\udc80')
REQUEST_TIMEOUT_S = 300


# ---- one request of each kind: each returns (outcome, detail) ----------------------------------

class CutShort(Exception):
    """The server answered, then the connection broke before the answer's end."""


async def post(client: httpx.AsyncClient, path: str, **body) -> httpx.Response:
    """POST and read the whole answer; a transport error after the status line raises ``CutShort``."""
    async with client.stream('POST', path, **body) as response:
        try:
            await response.aread()
        except httpx.TransportError as exc:
            raise CutShort(f'{path} answered {response.status_code}, then {type(exc).__name__}: {exc}') from exc
    return response


def error_shaped(response: httpx.Response) -> bool:
    with contextlib.suppress(ValueError):
        error = response.json().get('error')
        return isinstance(error, dict) and isinstance(error.get('message'), str) and 'type' in error
    return False


def judge(response: httpx.Response, expect_error: bool) -> tuple[str, str]:
    """The outcome of a finished non-stream answer."""
    status = f'{response.status_code} {response.text[:200]!r}'
    if response.status_code >= 500:
        return SERVER_ERROR, status
    if response.status_code >= 400:
        if not error_shaped(response):
            return UNEXPECTED, f'not OpenAI-shaped: {status}'
        return (EXPECTED_4XX, '') if expect_error else (UNEXPECTED, f'refused: {status}')
    return (UNEXPECTED, f'accepted: {status}') if expect_error else (OK, '')


async def read_stream(client, path: str, body: dict, drop_after: int | None = None, on_first=None,
                      last: dict | None = None):
    """A streamed request (SSE or /generate's lines) read to its end, or dropped after ``drop_after``
    events; ``on_first`` runs after the first event (a cancel); ``last`` receives the last event."""
    async with client.stream('POST', path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return judge(response, expect_error=False)
        events, finished = 0, False
        try:
            async for line in response.aiter_lines():
                data = line.removeprefix('data: ').strip()
                if not data or data == '[DONE]':
                    finished = finished or data == '[DONE]'
                    continue
                event = json.loads(data)
                if 'error' in event or event.get('finish_reason') == 'error':
                    return SERVER_ERROR, f'an error in a stream: {data[:200]}'
                events += 1
                if last is not None:
                    last.update(event)
                finished = finished or (path == '/generate' and event.get('finish_reason') is not None)
                if events == 1 and on_first is not None and (outcome := await on_first())[0] != OK:
                    return outcome
                if drop_after is not None and events >= drop_after:
                    return DISCONNECTED, ''
        except httpx.TransportError as exc:
            raise CutShort(f'{path} stream after {events} events: {type(exc).__name__}: {exc}') from exc
        return (OK, '') if finished else (SERVER_ERROR, f'{path} stream ended without its last event')


def system_prompts(rules: int) -> list[str]:
    """Two long system prompts (about 14 tokens a rule) shared by many chats: with prefix caching
    their KV blocks are reused."""
    return [' '.join(f'Rule {i}: answer {style}, and never mention rule {i + 1}.' for i in range(rules))
            for style in STYLES]


def chat_body(ctx, rng: random.Random, stream: bool, max_tokens: int | None = None) -> dict:
    messages = [{'role': 'user', 'content': f'Write two sentences about {rng.choice(TOPICS)}.'}]
    if rng.random() < 0.5:
        messages.insert(0, {'role': 'system', 'content': rng.choice(ctx['system_prompts'])})
    return {'model': ctx['model'], 'messages': messages, 'max_tokens': max_tokens or rng.randint(4, 40),
            'stream': stream, 'temperature': rng.choice([0.0, 0.8])}


def completion_body(ctx, rng: random.Random, stream: bool) -> dict:
    return {'model': ctx['model'], 'prompt': f'A short note on {rng.choice(TOPICS)}:', 'stream': stream,
            'max_tokens': rng.randint(4, 40), 'n': rng.choice([1, 1, 2]), 'temperature': rng.choice([0.0, 0.8])}


def generate_body(rng: random.Random, stream: bool, **extra) -> dict:
    return {'prompt': f'Tell me about {rng.choice(TOPICS)}.', 'stream': stream,
            'request_output_len': rng.randint(4, 40), **extra}


async def chat(client, ctx, rng):
    return judge(await post(client, '/v1/chat/completions', json=chat_body(ctx, rng, False)), False)


async def chat_stream(client, ctx, rng):
    return await read_stream(client, '/v1/chat/completions', chat_body(ctx, rng, True))


async def completion(client, ctx, rng):
    return judge(await post(client, '/v1/completions', json=completion_body(ctx, rng, False)), False)


async def completion_stream(client, ctx, rng):
    return await read_stream(client, '/v1/completions', completion_body(ctx, rng, True))


async def generate(client, ctx, rng):
    return judge(await post(client, '/generate', json=generate_body(rng, False)), False)


async def generate_stream(client, ctx, rng):
    return await read_stream(client, '/generate', generate_body(rng, True))


async def known_answer(client, ctx, rng):
    response = await post(client, '/v1/chat/completions', json={
        'model': ctx['model'], 'messages': [{'role': 'user', 'content': FRANCE}], 'max_tokens': 16, 'temperature': 0})
    outcome = judge(response, False)
    if outcome[0] == OK and 'Paris' not in response.json()['choices'][0]['message']['content']:
        return UNEXPECTED, f'the known greedy answer changed: {response.text[:200]!r}'
    return outcome


async def disconnect(client, ctx, rng):
    path, body = rng.choice([('/v1/chat/completions', chat_body(ctx, rng, True, max_tokens=200)),
                             ('/generate', generate_body(rng, True, request_output_len=200))])
    return await read_stream(client, path, body, drop_after=rng.randint(1, 3))


async def cancel(client, ctx, rng):
    """A /generate stream of the client's own session id, cancelled after its first event: it must
    end with 'abort' (300 tokens, EOS ignored, cannot end first)."""
    session_id = rng.randint(1, 2**31 - 1)

    async def send_cancel():
        return judge(await post(client, '/generate', json={'prompt': '', 'session_id': session_id, 'cancel': True}),
                     False)
    last = {}
    outcome = await read_stream(client, '/generate', generate_body(rng, True, session_id=session_id, ignore_eos=True,
                                                                   request_output_len=300),
                                on_first=send_cancel, last=last)
    if outcome[0] == OK and last.get('finish_reason') != 'abort':
        return UNEXPECTED, f'the cancelled stream ended with {last.get("finish_reason")!r}'
    return outcome


async def session(client, ctx, rng):
    """Two turns of an interactive /generate session; the second (interactive_mode off) ends it."""
    session_id = rng.randint(1, 2**31 - 1)
    for interactive in (True, False):
        outcome = judge(await post(client, '/generate', json=generate_body(
            rng, False, session_id=session_id, interactive_mode=interactive)), False)
        if outcome[0] != OK:
            return outcome
    return OK, ''


def raw(body) -> bytes:
    """JSON bytes as sent; ``ensure_ascii`` keeps a lone surrogate as a (valid JSON) escape."""
    return json.dumps(body).encode()


def bad_requests(ctx, rng: random.Random) -> list[tuple[str, str, bytes]]:
    """(path, what is wrong, raw JSON body) of requests that must be refused with a 4xx."""
    model = ctx['model']

    def chat_with(**fields) -> bytes:
        return raw({'model': model, 'messages': [{'role': 'user', 'content': 'hi'}], **fields})
    return [
        ('/v1/chat/completions', 'negative temperature', chat_with(temperature=-1)),
        ('/v1/chat/completions', 'top_k of a string', chat_with(top_k='x')),
        ('/v1/chat/completions', 'top_k over the vocabulary', chat_with(top_k=10**6)),
        ('/v1/chat/completions', 'n of 0', chat_with(n=0)),
        ('/v1/chat/completions', 'no messages', raw({'model': model, 'messages': []})),
        ('/v1/chat/completions', 'a lone surrogate', raw({'model': model, 'messages': [
            {'role': 'user', 'content': 'a' + rng.choice(LONE_SURROGATES) + 'b'}]})),
        ('/v1/chat/completions', 'an unknown model', chat_with(model='no-such-model')),
        ('/v1/chat/completions', 'broken JSON', b'{"model": "' + model.encode() + b'", "messages": ['),
        ('/v1/completions', 'a lone surrogate', raw({'model': model, 'prompt': 'x' + rng.choice(LONE_SURROGATES)})),
        ('/v1/completions', 'a prompt over session_len', raw({'model': model, 'prompt': 'word ' * OVER_SESSION_WORDS})),
        ('/generate', 'a lone surrogate', raw({'prompt': rng.choice(LONE_SURROGATES), 'stream': rng.random() < 0.5})),
        ('/generate', 'an empty raw prompt, streamed', raw({'prompt': '', 'do_preprocess': False, 'stream': True})),
    ]


async def bad_request(client, ctx, rng):
    if rng.random() < 0.05:   # 9 MiB: rarely
        path, what = '/v1/completions', 'an oversize body'
        body = raw({'model': ctx['model'], 'prompt': 'a' * OVERSIZE_BYTES})
    else:
        path, what, body = rng.choice(bad_requests(ctx, rng))
    try:
        outcome, detail = judge(await post(client, path, content=body, headers={'content-type': 'application/json'}),
                                True)
    except (httpx.TransportError, httpx.TimeoutException) as exc:
        outcome, detail = LOST, f'{type(exc).__name__}: {exc}'
    return outcome, f'{what} on {path}: {detail}' if detail else ''


KINDS = {chat: 12, chat_stream: 12, completion: 8, completion_stream: 8, generate: 6, generate_stream: 6,
         known_answer: 3, disconnect: 8, cancel: 5, session: 4, bad_request: 12}


# ---- the run -------------------------------------------------------------------------------------

async def worker(index: int, url: str, ctx: dict, deadline: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed * 1000 + index)
    kinds, weights = list(KINDS), list(KINDS.values())
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, headers=ctx['headers']) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            try:
                outcome, detail = await kind(client, ctx, rng)
            except CutShort as exc:
                outcome, detail = SERVER_ERROR, str(exc)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                outcome, detail = LOST, f'{type(exc).__name__}: {exc}'
            except (ValueError, KeyError) as exc:      # an answer that does not parse
                outcome, detail = UNEXPECTED, f'{type(exc).__name__}: {exc}'
            tally.record(kind.__name__, outcome, detail)


async def sample_rss(pid: int | None, start: float, samples: list, every_s: float, stop: asyncio.Event) -> None:
    while pid is not None and not stop.is_set():
        if (rss := rss_mib(pid)) is not None:
            samples.append((time.monotonic() - start, rss))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def traffic(url: str, pid: int | None, ctx: dict, args, tally: Tally) -> list:
    start = time.monotonic()
    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, start, samples, args.sample_seconds, stop))
    deadline = start + args.minutes * 60
    await asyncio.gather(*(worker(i, url, ctx, deadline, tally, args.seed) for i in range(args.concurrency)))
    stop.set()
    await sampler
    return samples


def soak(url: str, pid: int | None, args) -> dict:
    headers = {'Authorization': f'Bearer {args.api_key}'} if args.api_key else {}
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S, headers=headers) as client:
        ctx = {'model': client.get('/v1/models').json()['data'][0]['id'], 'headers': headers,
               'system_prompts': system_prompts(args.system_rules)}
        before = wait_idle(client)
        tally = Tally()
        samples = asyncio.run(traffic(url, pid, ctx, args, tally))
        after = wait_idle(client)
    start_used, end_used = kv_used(before), kv_used(after)
    leaked = None if start_used is None or end_used is None else end_used - start_used
    totals = tally.totals()
    return {'minutes': args.minutes, 'url': url, 'concurrency': args.concurrency, 'seed': args.seed,
            'requests': {kind: dict(counts) for kind, counts in tally.counts.items()}, 'totals': totals,
            'examples': dict(tally.examples),
            'kv_blocks': {'start_used': start_used, 'end_used': end_used, 'leaked': leaked,
                          'total': int((after or before or {}).get('lmdeploy_jax_engine_kv_blocks_total', 0))},
            'engine_counts': engine_counts(before, after), 'rss': rss_summary(samples), 'rss_samples': samples,
            'failures': verdict(totals, leaked)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--minutes', type=float, default=30, help='how long the traffic runs')
    parser.add_argument('--url', default=None, help='a running server; without it one is started here')
    parser.add_argument('--pid', type=int, default=None, help="the running server's pid, for its memory")
    parser.add_argument('--model', default=None, help='the model of a server started here (default: the embedded one)')
    parser.add_argument('--server-args', nargs=argparse.REMAINDER, default=[],
                        help='the rest goes to the server started here (e.g. --session-len 4096)')
    parser.add_argument('--api-key', default=None, help='sent as a Bearer token')
    parser.add_argument('--concurrency', type=int, default=8, help='clients sending at once')
    parser.add_argument('--system-rules', type=int, default=12,
                        help='length of the shared system prompts, in rules of about 14 tokens')
    parser.add_argument('--sample-seconds', type=float, default=10, help='how often RSS is read')
    parser.add_argument('--seed', type=int, default=None, help='traffic seed (default: fresh, printed)')
    parser.add_argument('--output', default=None, help='write the JSON report here too')
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f'soak: {args.minutes} min, {args.concurrency} clients, seed {args.seed}', flush=True)
    with (contextlib.nullcontext((args.url, args.pid)) if args.url else started_server(args)) as (url, pid):
        report = soak(url, pid, args)
    text = json.dumps(report, indent=1)
    if args.output:
        with open(args.output, 'w') as f:
            f.write(text + '\n')
    print(text)
    print(human_summary(report))
    return 1 if report['failures'] else 0


if __name__ == '__main__':
    sys.exit(main())
