"""The OpenAI-compatible server end to end: a real uvicorn server on localhost, the official
``openai`` client, the real default model (SmolLM2-135M-Instruct), greedy decoding.

One server serves the whole module; ``running_server`` is also used by the other server tests.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import openai
import pytest

BACKEND = os.environ.get('LMDEPLOY_JAX_TEST_BACKEND', 'turbomind')   # 'pytorch': the reference backend
FRANCE = 'What is the capital of France?'
START_TIMEOUT_S = 240
# The JAX engine's flags of every server test module: one set of compiled steps, which the executable
# store keeps for the next module's server. A decode step on the CPU reads every page of its table, so
# its cost grows with the session; this one leaves room for a generation long enough to disconnect from.
SESSION_LEN = 1024
ENGINE_FLAGS = ('--session-len', str(SESSION_LEN))
# one math thread: the test client shares the machine's 2 cores, and torch's spinning threads slow 15x
# when a core is taken from them
CHILD_ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(*flags: str, backend: str = BACKEND):
    """``lmdeploy_jax serve api_server`` in a subprocess on a free port; yields (base URL, process)
    once /health answers, and stops the process (if still running) after."""
    port = _free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, '-m', 'lmdeploy_jax.cli.main', 'serve', 'api_server',
                             '--server-name', '127.0.0.1', '--server-port', str(port), '--backend', backend,
                             *flags], stdout=log, stderr=subprocess.STDOUT, env=CHILD_ENV)
    base = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f'the server did not start:\n{log.read().decode()[-3000:]}')
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f'{base}/health', timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def running_server(*flags: str, backend: str = BACKEND):
    """``server_process``'s base URL alone."""
    with server_process(*flags, backend=backend) as (base, _):
        yield base


def scrape(base: str, headers: dict | None = None) -> dict[str, float]:
    """``/metrics`` as {sample name with labels: value}."""
    text = httpx.get(f'{base}/metrics', headers=headers).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'^(\w+(?:\{[^}]*\})?) (\S+)$', text, re.M)}


@pytest.fixture(scope='module')
def base():
    with running_server(*ENGINE_FLAGS) as url:
        yield url


@pytest.fixture(scope='module')
def client(base):
    return openai.OpenAI(base_url=f'{base}/v1', api_key='unused', max_retries=0, timeout=300)


@pytest.fixture(scope='module')
def model(client):
    [entry] = client.models.list().data
    return entry.id


@pytest.fixture(scope='module')
def hf_tokenizer():
    from lmdeploy_jax.checkpoint.source import resolve_model
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model(None).hf_dir)


def chat(client, model, content=FRANCE, **kwargs):
    kwargs = {'max_tokens': 16, 'temperature': 0, **kwargs}
    return client.chat.completions.create(model=model, messages=[{'role': 'user', 'content': content}], **kwargs)


@pytest.fixture(scope='module')
def paris(client, model):
    return chat(client, model)


def test_chat_answers_with_the_tokenizers_usage(paris, hf_tokenizer):
    [choice] = paris.choices
    assert 'Paris' in choice.message.content and choice.message.role == 'assistant'
    assert choice.finish_reason == 'stop' and paris.object == 'chat.completion'
    prompt_ids = hf_tokenizer.apply_chat_template([{'role': 'user', 'content': FRANCE}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)
    usage = paris.usage
    assert usage.prompt_tokens == len(prompt_ids)
    assert usage.completion_tokens == len(hf_tokenizer.encode(choice.message.content, add_special_tokens=False))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_adds_up_to_the_whole(client, model, paris):
    chunks = list(chat(client, model, stream=True, stream_options={'include_usage': True}))
    assert chunks[0].choices[0].delta.role == 'assistant'
    assert ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices) == paris.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == 'stop'
    assert chunks[-1].choices == [] and chunks[-1].usage == paris.usage


def test_sse_ends_with_done(base, model):
    body = {'model': model, 'prompt': 'The capital of France is', 'max_tokens': 2, 'stream': True}
    with httpx.stream('POST', f'{base}/v1/completions', json=body, timeout=120) as r:
        assert r.headers['content-type'].startswith('text/event-stream')
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == 'data: [DONE]' and all(e.startswith('data: ') for e in events)


def test_completion_and_its_stream(client, model, hf_tokenizer):
    prompt = 'The capital of France is'
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
    assert 'Paris' in whole.choices[0].text and whole.choices[0].finish_reason == 'length'
    assert whole.usage.prompt_tokens == len(hf_tokenizer.encode(prompt)) and whole.usage.completion_tokens == 4
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, stream=True)
    assert ''.join(c.choices[0].text for c in stream) == whole.choices[0].text


def test_n_gives_independent_choices(client, model):
    resp = client.chat.completions.create(model=model, messages=[{'role': 'user', 'content': 'Name a colour.'}],
                                          n=2, max_tokens=6, temperature=1.0, seed=3)
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert all(c.message.content for c in resp.choices) and 2 <= resp.usage.completion_tokens <= 12
    again = client.chat.completions.create(model=model, messages=[{'role': 'user', 'content': 'Name a colour.'}],
                                           n=2, max_tokens=6, temperature=1.0, seed=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in resp.choices]


@pytest.mark.parametrize('stop', ['Paris', 'of Fra', ['xyz', ' is']])
def test_stop_strings_end_the_text(client, model, paris, stop):
    full = paris.choices[0].message.content
    first = stop if isinstance(stop, str) else stop[1]
    resp = chat(client, model, stop=stop)
    assert resp.choices[0].message.content == full[:full.index(first)]
    assert resp.choices[0].finish_reason == 'stop'


def test_multi_token_stop_string_streamed(client, model, paris):
    full = paris.choices[0].message.content
    text = ''.join(c.choices[0].delta.content or '' for c in chat(client, model, stop='of Fra', stream=True))
    assert text == full[:full.index('of Fra')]


def test_chat_logprobs(client, model, paris):
    resp = chat(client, model, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert ''.join(e.token for e in content) == resp.choices[0].message.content == paris.choices[0].message.content
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.logprob == tops[0] <= 0  # greedy: the best
        assert bytes(entry.bytes).decode() == entry.token


def test_completion_logprobs(client, model):
    resp = client.completions.create(model=model, prompt='The capital of France is', max_tokens=3, temperature=0,
                                     logprobs=2)
    lp = resp.choices[0].logprobs
    assert ''.join(lp.tokens) == resp.choices[0].text and len(lp.token_logprobs) == 3
    assert all(len(top) == 2 and max(top.values()) == v for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(3)]


def test_sampling_fields_are_honoured(client, model):
    kwargs = dict(max_tokens=4, temperature=1.0, top_p=0.9, seed=11,
                  extra_body={'top_k': 20, 'min_p': 0.05, 'repetition_penalty': 1.1})
    first = chat(client, model, 'Tell me a word.', **kwargs)
    assert chat(client, model, 'Tell me a word.', **kwargs).choices[0].message.content == \
        first.choices[0].message.content
    long = chat(client, model, max_tokens=None, max_completion_tokens=3, extra_body={'ignore_eos': True})
    assert long.usage.completion_tokens == 3 and long.choices[0].finish_reason == 'length'


def test_encode_matches_the_tokenizer(base, hf_tokenizer):
    r = httpx.post(f'{base}/v1/encode', json={'input': ['Hello world', 'Paris']}).json()
    assert r['input_ids'] == [hf_tokenizer.encode('Hello world'), hf_tokenizer.encode('Paris')]
    assert r['length'] == [len(i) for i in r['input_ids']]


def _generate(base, prompt, session_id, interactive, **kwargs):
    body = {'prompt': prompt, 'session_id': session_id, 'interactive_mode': interactive, 'temperature': 0,
            'request_output_len': 12, **kwargs}
    r = httpx.post(f'{base}/generate', json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_interactive_session_remembers(base):
    first = _generate(base, FRANCE, 77, True)
    assert 'Paris' in first['text'] and first['history_tokens'] == 0
    second = _generate(base, 'And of Germany?', 77, False)    # the last turn of the session
    assert 'Berlin' in second['text'] and second['history_tokens'] > first['input_tokens']
    fresh = _generate(base, 'And of Germany?', 77, False)     # the session was ended: no history
    assert fresh['history_tokens'] == 0 and 'Berlin' not in fresh['text']


def test_generate_streams_json_lines(base):
    body = {'prompt': FRANCE, 'stream': True, 'temperature': 0, 'request_output_len': 16}
    with httpx.stream('POST', f'{base}/generate', json=body, timeout=300) as r:
        lines = [httpx.Response(200, content=line).json() for line in r.iter_lines() if line]
    assert 'Paris' in ''.join(line['text'] for line in lines) and lines[-1]['finish_reason'] == 'stop'


def _bad_requests(model: str) -> list[tuple[str, dict | bytes, int, str | None]]:
    """(path, body, expected status, expected error param) of each kind of bad input."""
    msg = [{'role': 'user', 'content': 'hi'}]
    return [
        ('/v1/chat/completions', b'{"model": "x", "messages": [', 400, None),
        ('/v1/chat/completions', b'{"pad": "' + b'x' * (9 << 20) + b'"}', 413, None),
        ('/v1/chat/completions', {'model': 'no-such-model', 'messages': msg}, 404, 'model'),
        ('/v1/chat/completions', {'model': model, 'messages': msg, 'max_tokens': 100_000}, 400, 'max_tokens'),
        ('/v1/completions', {'model': model, 'prompt': 'hi', 'max_tokens': SESSION_LEN}, 400, 'max_tokens'),
        ('/v1/chat/completions', {'model': model, 'messages': msg, 'temperature': -0.5}, 400, 'temperature'),
        ('/v1/chat/completions', {'model': model, 'messages': []}, 400, 'messages'),
        ('/v1/chat/completions', {'model': model, 'messages': [{'role': 'wizard', 'content': 'hi'}]}, 400,
         'messages.0.role'),
        ('/v1/chat/completions', {'model': model, 'messages': msg, 'n': 0}, 400, 'n'),
        ('/v1/completions', {'model': model, 'prompt': 'hi', 'top_p': 1.5}, 400, 'top_p'),
        ('/v1/chat/completions', {'model': model}, 400, 'messages'),
    ]


def test_bad_input_is_refused_while_a_good_request_is_served(base, client, model, paris):
    good: list = []
    worker = threading.Thread(target=lambda: good.append(chat(client, model, stream=True)))
    worker.start()
    for path, body, status, param in _bad_requests(model):
        kwargs = {'content': body, 'headers': {'content-type': 'application/json'}} if isinstance(body, bytes) \
            else {'json': body}
        r = httpx.post(f'{base}{path}', timeout=60, **kwargs)
        assert r.status_code == status, (path, r.text[:300])
        error = r.json()['error']
        assert set(error) == {'message', 'type', 'param', 'code'} and error['message'], error
        assert error['param'] == param, error
    worker.join(300)
    assert ''.join(c.choices[0].delta.content or '' for c in good[0]) == paris.choices[0].message.content


def test_the_openai_client_raises_typed_errors(client, model):
    with pytest.raises(openai.NotFoundError):
        chat(client, 'no-such-model')
    with pytest.raises(openai.BadRequestError, match='temperature'):
        client.chat.completions.create(model=model, messages=[{'role': 'user', 'content': 'hi'}], temperature=-1)


def _wait_idle(base: str, key: str = 'lmdeploy_jax_generations_running', timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape(base)
        if metrics[key] == 0 and metrics.get('lmdeploy_jax_engine_running', 0) == 0 \
                and metrics.get('lmdeploy_jax_engine_waiting', 0) == 0:
            return metrics
        assert time.monotonic() < deadline, metrics
        time.sleep(0.2)


@pytest.mark.parametrize('stream', [True, False])
def test_a_client_that_disconnects_frees_its_request(base, model, stream):
    """A client that closes its stream after the first event, or gives up waiting after a second,
    ends its request long before its ``max_tokens``; every KV block it held is free again."""
    before = _wait_idle(base)
    max_tokens = SESSION_LEN - 64
    body = {'model': model, 'prompt': 'Tell me a long story.', 'max_tokens': max_tokens, 'ignore_eos': True,
            'stream': stream}
    if stream:
        with httpx.stream('POST', f'{base}/v1/completions', json=body, timeout=120) as r:
            lines = r.iter_lines()
            assert next(lines).startswith('data: ')
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f'{base}/v1/completions', json=body, timeout=1)
    after = _wait_idle(base)
    assert after['lmdeploy_jax_generation_tokens_total'] < before['lmdeploy_jax_generation_tokens_total'] + max_tokens
    if BACKEND == 'turbomind':   # the JAX engine's paged cache: every block of the request is back
        assert 'lmdeploy_jax_engine_kv_blocks_free' in after, \
            "JaxEngine.stats() lacks 'kv_blocks_free'/'kv_blocks_total' (engine_api.InferenceEngine.stats)"
        assert after['lmdeploy_jax_engine_kv_blocks_free'] == before['lmdeploy_jax_engine_kv_blocks_free']
        assert after['lmdeploy_jax_engine_kv_blocks_used'] == before['lmdeploy_jax_engine_kv_blocks_used']


CONCURRENT_STREAMS = 32        # twice the JAX engine's CPU batch (16): half of them wait in its queue


def test_many_concurrent_streams_are_complete_and_unmixed(base, client, model):
    """``CONCURRENT_STREAMS`` streams at once, each of a distinct prompt, each equal to that prompt's
    answer when run alone."""
    prompts = [f'{i}, {i + 1}, {i + 2},' for i in range(CONCURRENT_STREAMS)]
    kwargs = dict(model=model, max_tokens=3, temperature=0)
    solo = [client.completions.create(prompt=p, **kwargs).choices[0].text for p in prompts]
    assert len(set(solo)) > 3 * len(prompts) // 4   # the prompts are told apart by their answers

    async def stream_all():
        aclient = openai.AsyncOpenAI(base_url=f'{base}/v1', api_key='unused', max_retries=0, timeout=600,
                                     http_client=openai.DefaultAsyncHttpxClient(
                                         limits=httpx.Limits(max_connections=100)))

        async def one(prompt):
            chunks = [c async for c in await aclient.completions.create(prompt=prompt, stream=True, **kwargs)]
            return ''.join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        async with aclient:
            return await asyncio.gather(*(one(p) for p in prompts))

    together = asyncio.run(stream_all())
    assert [text for text, _ in together] == solo
    assert all(reason in ('stop', 'length') for _, reason in together)


def test_metrics_count_requests_and_tokens(base, client, model):
    ok = 'lmdeploy_jax_http_requests_total{route="/v1/chat/completions",status="200"}'
    before = scrape(base)
    resp = chat(client, model, max_tokens=3, extra_body={'ignore_eos': True})
    after = scrape(base)
    assert after[ok] == before.get(ok, 0) + 1
    assert after['lmdeploy_jax_generation_tokens_total'] == before['lmdeploy_jax_generation_tokens_total'] + 3
    assert after['lmdeploy_jax_prompt_tokens_total'] == \
        before['lmdeploy_jax_prompt_tokens_total'] + resp.usage.prompt_tokens
    assert after['lmdeploy_jax_generations_running'] == 0


@pytest.mark.parametrize('pacing', [['--concurrency', '4'], ['--request-rate', '20']], ids=['concurrency', 'rate'])
def test_profile_restful_api_measures_the_server(base, pacing):
    out = subprocess.run([sys.executable, 'benchmark/profile_restful_api.py', '--base-url', base, '--num-prompts', '4',
                          '--output-len', '4', '--ignore-eos', '--input-len', '8', *pacing],
                         capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    [line] = out.stdout.splitlines()
    result = json.loads(line)
    assert result['completed'] == 4 and result['failed'] == 0 and result['output_tokens'] == 16
    assert 0 < result['ttft_ms']['p50'] <= result['e2e_latency_ms']['p50'] and result['tpot_ms']['p99'] > 0
    assert result['itl_ms']['mean'] > 0 and result['output_throughput'] > 0


def test_profile_restful_api_reports_latencies_at_each_request_rate(base):
    """Several ``--request-rate`` values after an unreported warm-up: one JSON line per rate, every
    request answered with exactly its tokens, TTFT within end-to-end latency, each run lasting at
    least until its Poisson schedule's last arrival (the pacing holds)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, 'benchmark'))
    from profile_restful_api import poisson_schedule
    rates, prompts = (2.0, 8.0), 3
    out = subprocess.run([sys.executable, 'benchmark/profile_restful_api.py', '--base-url', base, '--endpoint',
                          'completions', '--num-prompts', str(prompts), '--input-len', '6', '--output-len', '3',
                          '--ignore-eos', '--warmup', '1', '--request-rate', *map(str, rates)],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r['request_rate'] for r in records] == list(rates)
    for r in records:
        assert (r['completed'], r['failed'], r['output_tokens']) == (prompts, 0, 3 * prompts), r
        assert 0 < r['ttft_ms']['p50'] <= r['e2e_latency_ms']['p99'] and r['tpot_ms']['p99'] > 0
        assert r['duration_s'] >= poisson_schedule(prompts, r['request_rate'], 0)[-1]
