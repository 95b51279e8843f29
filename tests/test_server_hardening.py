"""The server against hostile-but-fair clients: sessions belong to their owner, bad input is a 400
naming the field (before any stream starts), stalled bodies hold no slot, shutdown is bounded.

One keyed server (the reference backend, which starts fastest) serves the module; its last test
stops it with SIGTERM. The attacks are the ones seen on the server before: guessing the ids of
others' generations from /metrics to cancel or occupy them, and one key cancelling another's.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from lmdeploy_jax.messages import GenerationConfig
from lmdeploy_jax.serve.async_engine import GenOut
from lmdeploy_jax.serve.openai.generation import Job
from lmdeploy_jax.serve.openai.shapes import ChatShape
from test_server import CHILD_ENV, FRANCE, scrape, server_process

KEY_A, KEY_B = 'key-alpha', 'key-beta'
AUTH_A, AUTH_B = {'Authorization': f'Bearer {KEY_A}'}, {'Authorization': f'Bearer {KEY_B}'}
ORIGIN = 'http://app.example'
BODY_TIMEOUT_S = 3
SHUTDOWN_TIMEOUT_S = 1
OLD_FIRST_SERVER_SESSION = 1 << 32     # where the server numbered its generations from one counter


@pytest.fixture(scope='module')
def server():
    with server_process('--api-keys', KEY_A, KEY_B, '', '--allow-origins', ORIGIN,
                        '--max-concurrent-requests', '2', '--body-timeout', str(BODY_TIMEOUT_S),
                        '--shutdown-timeout', str(SHUTDOWN_TIMEOUT_S), backend='pytorch') as (base, proc):
        yield SimpleNamespace(base=base, proc=proc)


@pytest.fixture(scope='module')
def base(server):
    return server.base


@pytest.fixture(scope='module')
def client(base):
    return openai.OpenAI(base_url=f'{base}/v1', api_key=KEY_A, max_retries=0, timeout=120)


@pytest.fixture(scope='module')
def model(client):
    [entry] = client.models.list().data
    return entry.id


def _generations(base: str) -> int:
    return int(scrape(base, headers=AUTH_A)['lmdeploy_jax_generations_total'])


# ---- sessions belong to their owner ------------------------------------------------------------

def test_generate_cannot_cancel_an_openai_stream(base, client, model):
    """The victim's id was 2**32 + (generations so far), readable from /metrics; now no id a client
    can name reaches it."""
    chunks = client.chat.completions.create(model=model, messages=[{'role': 'user', 'content': FRANCE}],
                                            max_tokens=40, temperature=0, stream=True,
                                            stream_options={'include_usage': True}, extra_body={'ignore_eos': True})
    received = [next(chunks)]
    guessed = _generations(base)
    attacks = [httpx.post(f'{base}/generate', headers=AUTH_B, timeout=30,
                          json={'prompt': 'x', 'session_id': OLD_FIRST_SERVER_SESSION + k, 'cancel': True})
               for k in range(max(0, guessed - 8), guessed + 2)]
    received += list(chunks)
    assert [c.choices[0].finish_reason for c in received if c.choices][-1] == 'length'
    assert received[-1].usage.completion_tokens == 40
    assert {r.status_code for r in attacks} == {400}
    assert {r.json()['error']['param'] for r in attacks} == {'session_id'}


def test_openai_requests_cannot_be_preclaimed(base, client, model):
    """Running generations under the next ids the server would hand out made its next request fail
    with 'session ... is busy'."""
    upcoming = _generations(base)     # all anonymous so far: the counter's next value (one slot is left)
    body = {'prompt': 'Count to a thousand.', 'session_id': OLD_FIRST_SERVER_SESSION + upcoming, 'stream': True,
            'request_output_len': 500, 'ignore_eos': True}
    with httpx.stream('POST', f'{base}/generate', json=body, headers=AUTH_B, timeout=60) as claim:
        if claim.status_code == 200:    # the claim runs while its stream is read (a dropped iterator hangs up)
            lines = claim.iter_lines()
            next(lines)
        reply = client.with_options(timeout=30).completions.create(model=model, prompt='The capital of France is',
                                                                   max_tokens=2, temperature=0)
    assert claim.status_code == 400 and 'Paris' in reply.choices[0].text


def _open_stream(base, headers, session_id, tokens):
    body = {'prompt': FRANCE, 'session_id': session_id, 'stream': True, 'request_output_len': tokens,
            'ignore_eos': True, 'temperature': 0}
    return httpx.stream('POST', f'{base}/generate', json=body, headers=headers, timeout=120)


def test_a_key_reaches_only_its_own_sessions(base):
    with _open_stream(base, AUTH_A, 7, 40) as victim:
        assert victim.status_code == 200
        lines = victim.iter_lines()
        next(lines)
        cancel = httpx.post(f'{base}/generate', json={'prompt': 'x', 'session_id': 7, 'cancel': True},
                            headers=AUTH_B, timeout=30)
        same_id = httpx.post(f'{base}/generate', headers=AUTH_B, timeout=120,
                             json={'prompt': 'Hi', 'session_id': 7, 'request_output_len': 3, 'ignore_eos': True})
        last = json.loads([line for line in lines if line][-1])
    assert cancel.status_code == 200 and same_id.status_code == 200, (cancel.text, same_id.text)
    assert same_id.json()['tokens'] == 3
    assert last['finish_reason'] == 'length' and last['tokens'] == 40
    with _open_stream(base, AUTH_A, 7, 500) as own:   # the owner's cancel does reach it
        lines = own.iter_lines()
        next(lines)
        httpx.post(f'{base}/generate', json={'prompt': 'x', 'session_id': 7, 'cancel': True}, headers=AUTH_A)
        last = json.loads([line for line in lines if line][-1])
    assert last['finish_reason'] == 'abort' and last['tokens'] < 500


# ---- bad input: a 400 naming the field, before any stream, on a connection that stays open -----

MESSAGE = [{'role': 'user', 'content': 'hi'}]
BAD = '\ud800'    # a lone surrogate: valid JSON ("\ud800"), not UTF-8


def _bad_inputs() -> list:
    chat = {'model': 'M', 'messages': MESSAGE}
    text = {'model': 'M', 'prompt': 'hi'}
    gen = {'prompt': 'hi'}
    return [
        ('/v1/chat/completions', {**chat, 'messages': [{'role': 'user', 'content': BAD}]}, 'messages.0.content'),
        ('/v1/chat/completions', {**chat, 'stream': True,
                                  'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'a' + BAD}]}]},
         'messages.0.content.0.text'),
        ('/v1/chat/completions', {**chat, 'messages': [{'role': 'user', 'content': 'hi', 'name': BAD}]},
         'messages.0.name'),
        ('/v1/chat/completions', {**chat, 'model': BAD}, 'model'),
        ('/v1/chat/completions', {**chat, 'logprobs': 'no'}, 'logprobs'),
        ('/v1/chat/completions', {**chat, 'temperature': float('nan')}, 'temperature'),
        ('/v1/chat/completions', {**chat, 'repetition_penalty': float('inf')}, 'repetition_penalty'),
        ('/v1/completions', {**text, 'prompt': BAD, 'stream': True}, 'prompt'),
        ('/v1/completions', {**text, 'prompt': ['ok', BAD]}, 'prompt.1'),
        ('/v1/completions', {**text, 'stop': BAD, 'stream': True}, 'stop'),
        ('/v1/completions', {**text, 'user': BAD}, 'user'),
        ('/v1/completions', {**text, 'stream': 'no'}, 'stream'),
        ('/v1/completions', {**text, 'top_k': 1 << 31}, 'top_k'),
        ('/v1/completions', {**text, 'prompt': ['a', 'b', 'c', 'd', 'e'], 'n': 64}, None),
        ('/generate', {**gen, 'prompt': BAD, 'stream': True}, 'prompt'),
        ('/generate', {**gen, 'prompt': [{'role': 'user', 'content': BAD}]}, 'prompt.0.content'),
        ('/generate', {**gen, 'prompt': '', 'do_preprocess': False, 'stream': True}, 'prompt'),
        ('/generate', {**gen, 'interactive_mode': 1, 'session_id': 3}, 'interactive_mode'),
        ('/generate', {**gen, 'session_id': 1 << 32}, 'session_id'),
        ('/v1/encode', {'input': ['ok', BAD]}, 'input.1'),
    ]


@pytest.mark.parametrize('path,body,param', _bad_inputs())
def test_bad_input_is_a_400_naming_the_field(base, model, path, body, param):
    if body.get('model') == 'M':
        body = {**body, 'model': model}
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request('POST', path, body=json.dumps(body), headers={**AUTH_A, 'Content-Type': 'application/json'})
        r = conn.getresponse()
        raw = r.read()
        assert r.status == 400, raw[:300]
        error = json.loads(raw)['error']
        assert set(error) == {'message', 'type', 'param', 'code'} and error['type'] == 'invalid_request_error'
        assert error['param'] == param, error
        conn.request('GET', '/v1/models', headers=AUTH_A)    # the connection stays open for the next request
        assert conn.getresponse().status == 200
    finally:
        conn.close()


@pytest.mark.parametrize('path', ['/v1/completions', '/generate'])
def test_top_k_past_the_vocabulary_is_refused_before_the_stream(base, model, path):
    """Within int32 (the request model's bound) but past the model's vocabulary."""
    body = {'model': model, 'prompt': 'hi', 'top_k': 1_000_000, 'stream': True}
    r = httpx.post(f'{base}{path}', json=body, headers=AUTH_A, timeout=60)
    assert r.status_code == 400, r.text[:300]
    assert r.json()['error']['message'].startswith('top_k must be')


async def _failing_stream(jobs):
    """A runner's stream that fails after its first increment (fault injection: no request can make
    the real engine fail mid-stream)."""
    yield 0, GenOut('Par', 0, 5, 1, None, [42])
    raise RuntimeError('the device went away')


def _collect(agen) -> list[str]:
    async def run():
        return [item async for item in agen]
    return asyncio.run(run())


def test_an_sse_stream_that_fails_ends_with_an_error_event_and_done():
    from lmdeploy_jax.serve.openai.routes_openai import _events
    server = SimpleNamespace(model_name='m', runner=SimpleNamespace(stream=_failing_stream))
    jobs = [Job(0, GenerationConfig(), input_ids=[1, 2])]
    out = _collect(_events(server, jobs, ChatShape(None, None), 5, include_usage=True))
    assert out[-1] == 'data: [DONE]\n\n'
    error = json.loads(out[-2].removeprefix('data: '))['error']
    assert 'the device went away' in error['message'] and error['type'] == 'server_error'
    assert json.loads(out[1].removeprefix('data: '))['choices'][0]['delta']['content'] == 'Par'


def test_a_generate_stream_that_fails_ends_with_an_error_line():
    from lmdeploy_jax.serve.openai.routes_native import _lines
    recorded = []
    out = _collect(_lines(SimpleNamespace(stream=_failing_stream), Job(0, GenerationConfig(), input_ids=[1, 2]),
                          recorded.append))
    lines = [json.loads(line) for line in out]
    assert lines[0]['text'] == 'Par' and lines[0]['finish_reason'] is None
    assert lines[-1]['finish_reason'] == 'error' and 'the device went away' in lines[-1]['error']
    assert lines[-1]['tokens'] == 1 and recorded == []


def test_an_unexpected_failure_is_an_openai_500_and_the_app_does_not_raise():
    """Fault injection: a route that fails unexpectedly. An exception that reaches uvicorn closes
    the keep-alive connection and answers plain text; the middleware answers instead."""
    from lmdeploy_jax.serve.openai.middleware import UnexpectedErrorMiddleware

    async def broken(scope, receive, send):
        raise KeyError('a bug')
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {'type': 'http.request', 'body': b'', 'more_body': False}
    asyncio.run(UnexpectedErrorMiddleware(broken)({'type': 'http', 'method': 'GET', 'path': '/x', 'headers': []},
                                                   receive, send))
    assert sent[0]['status'] == 500 and (b'connection', b'close') not in sent[0]['headers']
    error = json.loads(sent[1]['body'])['error']
    assert error['type'] == 'server_error' and 'a bug' in error['message'] and error['param'] is None


# ---- connection hygiene ------------------------------------------------------------------------

def _half_sent_body(base: str) -> socket.socket:
    """A client that sends its headers and half its body, then stalls."""
    url = urlsplit(base)
    body = json.dumps({'model': 'm', 'prompt': 'The capital of France is', 'max_tokens': 2}).encode()
    head = (f'POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {KEY_A}\r\n'
            f'Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n').encode()
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(head + body[:len(body) // 2])
    return sock


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b''
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_stalled_bodies_hold_no_slot_and_get_408(base, client, model):
    stalled = [_half_sent_body(base) for _ in range(3)]    # more than the 2 slots
    time.sleep(0.5)
    start = time.monotonic()
    reply = client.with_options(timeout=20).completions.create(model=model, prompt='The capital of France is',
                                                                max_tokens=2, temperature=0)
    assert 'Paris' in reply.choices[0].text
    answers = [_read_until_closed(sock, BODY_TIMEOUT_S + 10) for sock in stalled]
    assert time.monotonic() - start < BODY_TIMEOUT_S + 10
    for answer in answers:
        head, _, body = answer.partition(b'\r\n\r\n')
        assert head.startswith(b'HTTP/1.1 408') and b'connection: close' in head.lower(), answer[:300]
        assert json.loads(body)['error']['message'].startswith('the request body did not arrive')


def test_an_oversized_body_gets_its_413_and_the_connection_serves_the_next_request(base, model):
    """Answered before it was read, a 9 MiB body reset the connection under the asynchronous httpx
    client, which never saw the 413; read to its end and dropped, it gets the 413 on a connection
    that stays open."""
    async def post_twice():
        async with httpx.AsyncClient(base_url=base, headers=AUTH_A, timeout=60,
                                     limits=httpx.Limits(max_connections=1)) as session:
            big = await session.post('/v1/completions', content=b'{"pad": "' + b'x' * (9 << 20) + b'"}',
                                     headers={'content-type': 'application/json'})
            small = await session.post('/v1/completions', json={'model': model, 'prompt': 'The capital of France is',
                                                                 'max_tokens': 2, 'temperature': 0})
            return big, small
    big, small = asyncio.run(post_twice())
    assert big.status_code == 413 and 'over the limit' in big.json()['error']['message']
    assert big.headers.get('connection') != 'close'
    assert small.status_code == 200 and 'Paris' in small.json()['choices'][0]['text']


def test_a_body_declared_far_over_the_limit_is_refused_unread(base):
    url = urlsplit(base)
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(f'POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {KEY_A}\r\n'
                 f'Content-Type: application/json\r\nContent-Length: {1 << 40}\r\n\r\n{{"pad": "'.encode())
    answer = _read_until_closed(sock, 10)
    head = answer.partition(b'\r\n\r\n')[0]
    assert head.startswith(b'HTTP/1.1 413') and b'connection: close' in head.lower(), answer[:300]


@pytest.mark.parametrize('authorization', ['Bearer ', 'Bearer', 'Bearer  '])
def test_an_empty_key_is_no_key(base, authorization):
    """The server was started with an empty key among its keys (an unset $KEY); raw bytes, since
    HTTP clients refuse to send a header value that ends in a blank."""
    url = urlsplit(base)
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(f'GET /v1/models HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: {authorization}\r\n'
                 'Connection: close\r\n\r\n'.encode())
    head, _, body = _read_until_closed(sock, 30).partition(b'\r\n\r\n')
    assert head.startswith(b'HTTP/1.1 401'), head
    assert json.loads(body)['error']['type'] == 'authentication_error'


def test_only_empty_keys_stop_the_server_from_starting():
    out = subprocess.run([sys.executable, '-m', 'lmdeploy_jax.cli.main', 'serve', 'api_server', '--api-keys', '',
                          ' '], capture_output=True, text=True, timeout=60, env=CHILD_ENV)
    assert out.returncode == 2 and 'every key given is empty' in out.stderr, out.stderr[-2000:]


def test_cors_preflight_needs_no_key(base):
    preflight = httpx.options(f'{base}/v1/chat/completions',
                              headers={'Origin': ORIGIN, 'Access-Control-Request-Method': 'POST',
                                       'Access-Control-Request-Headers': 'authorization,content-type'})
    assert preflight.status_code == 200 and preflight.headers['access-control-allow-origin'] == ORIGIN
    refused = httpx.get(f'{base}/v1/models', headers={'Origin': ORIGIN})   # the browser may read the 401
    assert refused.status_code == 401 and refused.headers['access-control-allow-origin'] == ORIGIN


@pytest.mark.parametrize('path', ['/health', '/v1/models', '/metrics'])
def test_head_answers_where_get_does(base, path):
    get, head = httpx.get(f'{base}{path}', headers=AUTH_A), httpx.head(f'{base}{path}', headers=AUTH_A)
    assert get.status_code == head.status_code == 200 and head.content == b''
    assert head.headers.get('content-type') == get.headers.get('content-type')


def test_models_names_the_model_not_its_path(model):
    from lmdeploy_jax.checkpoint.source import default_model_path
    assert model == os.path.basename(default_model_path()).removesuffix('.gguf')   # the default is a GGUF file
    assert os.sep not in model


def test_sigterm_ends_the_server_within_its_bound(server, client, model):
    """Last in the module: it stops the server. Two long streams and a stalled body are running;
    the streams get the grace period, then are aborted and end as streams do (finish_reason
    'abort', [DONE]), and the server exits."""
    from lmdeploy_jax.serve.openai.limits import ABORTED_REQUESTS_END_S
    streams = [client.completions.create(model=model, prompt='Count to a thousand:', max_tokens=1500,
                                         extra_body={'ignore_eos': True}, stream=True) for _ in range(2)]
    for stream in streams:
        next(iter(stream))
    stalled = _half_sent_body(server.base)
    ended = []

    def drain(stream):
        chunks = list(stream)
        ended.append((time.monotonic(), chunks[-1].choices[0].finish_reason))
    drains = [threading.Thread(target=drain, args=(s,)) for s in streams]
    for t in drains:
        t.start()
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(SHUTDOWN_TIMEOUT_S + ABORTED_REQUESTS_END_S + 20)   # uvicorn re-raises the signal at its end
    assert time.monotonic() - start < SHUTDOWN_TIMEOUT_S + ABORTED_REQUESTS_END_S + 20
    for t in drains:
        t.join(10)
    assert [reason for _, reason in ended] == ['abort', 'abort']
    assert all(when - start >= SHUTDOWN_TIMEOUT_S - 0.1 for when, _ in ended)   # the grace period was given
    _read_until_closed(stalled, 10)    # its connection is closed too
