"""Schema-driven fuzzing of a running server from its own OpenAPI document (schemathesis).

A real server on 127.0.0.1 (the JAX engine, the default model, API keys on) answers requests that
schemathesis generates from ``/openapi.json``: fitting the schema (positive) and breaking it
(negative), sent with the right key, a wrong one or none, some with a lone surrogate put into one
of their documented text fields. Every answer must be below 500, a bad key must get a 401, every
4xx must carry OpenAI's error shape (``errors.py``: ``{"error": {"message", "type", "param",
"code"}}``), every stream must end normally, text that is not UTF-8 must be refused, and
afterwards the server still answers a known greedy question correctly through the official
``openai`` client.

Each generated request is made cheap before it is sent (few tokens, few choices) and, most of the
time, names the served model, so the generating paths run rather than stopping at a 404.
Schemathesis's coverage phase is off: it alone sends hundreds of requests per operation.
"""
from __future__ import annotations

import json

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from test_server import ENGINE_FLAGS, FRANCE, running_server

KEY = 'fuzz-key'
AUTH_HEADERS = {'right key': {'Authorization': f'Bearer {KEY}'}, 'wrong key': {'Authorization': 'Bearer nope'},
                'no key': {}, 'empty bearer': {'Authorization': 'Bearer '}}
AUTHS = st.sampled_from(['right key'] * 6 + ['wrong key', 'no key', 'empty bearer'])
LONE_SURROGATES = ('\ud800', '\udfff', '\udc80')   # valid JSON escapes, not encodable as UTF-8
OPEN_PATHS = {'/health'}
OPERATIONS = [('GET', '/v1/models'), ('POST', '/v1/chat/completions'), ('POST', '/v1/completions'),
              ('GET', '/health'), ('GET', '/metrics'), ('POST', '/v1/encode'), ('POST', '/generate')]
EXAMPLES = {'POST': 40, 'GET': 5}              # per operation and mode; a GET has nothing to vary but the key
MAX_TOKENS, MAX_CHOICES = 6, 2
TOKEN_FIELDS = {'/v1/chat/completions': 'max_tokens', '/v1/completions': 'max_tokens',
                '/generate': 'request_output_len'}       # the field bounding a route's generation
REQUEST_TIMEOUT_S = 120


@pytest.fixture(scope='module')
def base():
    with running_server(*ENGINE_FLAGS, '--api-keys', KEY) as url:
        yield url


@pytest.fixture(scope='module')
def api_schema(base):
    config = schemathesis.Config.from_dict({'phases': {'coverage': {'enabled': False}}, 'max-stream-events': 1000,
                                            'output': {'sanitization': {'enabled': False}}})
    return schemathesis.openapi.from_url(f'{base}/openapi.json', headers=AUTH_HEADERS['right key'], config=config)


@pytest.fixture(scope='module')
def model(base):
    client = openai.OpenAI(base_url=f'{base}/v1', api_key=KEY, max_retries=0, timeout=REQUEST_TIMEOUT_S)
    return client.models.list().data[0].id


def test_the_schema_documents_every_operation_fuzzed_here(api_schema):
    documented = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert documented == set(OPERATIONS)


def whole_number(value) -> bool:
    """An int, or a float of a whole value (``40.0``: the server reads it as the int)."""
    return type(value) is int or (type(value) is float and value.is_integer())


def make_cheap(body, path: str, model: str, name_the_model: bool):
    """The body with token counts and choices capped (values the schema allows stay allowed, and
    values it refuses stay refused; an absent count is set; a whole float stays a float), and the
    served model named when ``name_the_model``."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if path in TOKEN_FIELDS and body.get(TOKEN_FIELDS[path]) is None:
        body[TOKEN_FIELDS[path]] = MAX_TOKENS
    for name in ('max_tokens', 'max_completion_tokens', 'request_output_len'):
        if whole_number(body.get(name)) and body[name] > MAX_TOKENS:
            body[name] = type(body[name])(MAX_TOKENS)
    if whole_number(body.get('n')) and MAX_CHOICES < body['n'] <= 64:
        body['n'] = type(body['n'])(MAX_CHOICES)
    if name_the_model and 'model' in body:
        body['model'] = model
    return body


def text_leaves(body, fields: set[str], trail=()):
    """Paths to the strings inside a JSON body (dict keys and list indices) under the documented
    ``fields`` (extra fields are ignored by the server), the model's name aside."""
    if isinstance(body, str):
        yield trail
    elif isinstance(body, (dict, list)):
        for key, value in (body.items() if isinstance(body, dict) else enumerate(body)):
            if isinstance(key, int) or (key in fields and key != 'model'):
                yield from text_leaves(value, fields, (*trail, key))


def with_lone_surrogate(body, fields: set[str], choice: int, surrogate: str):
    """``body`` with ``surrogate`` put in the middle of one of its strings (picked by ``choice``) and
    that string's path, or ``body`` and None when it holds no string."""
    leaves = list(text_leaves(body, fields))
    if not leaves:
        return body, None
    target = leaves[choice % len(leaves)]

    def rebuild(node, trail):
        if trail == target:
            return node[:len(node) // 2] + surrogate + node[len(node) // 2:]
        if isinstance(node, dict):
            return {key: rebuild(value, (*trail, key)) for key, value in node.items()}
        if isinstance(node, list):
            return [rebuild(value, (*trail, i)) for i, value in enumerate(node)]
        return node
    return rebuild(body, ()), target


def check_answer(response, path: str, auth: str, poisoned: tuple | None = None) -> None:
    """No 5xx; a refused key is a 401 (except on open paths); a 4xx is OpenAI-shaped; a stream ends;
    a body holding a lone surrogate (at ``poisoned``) is refused."""
    assert response.status_code < 500, 'a server error'
    if poisoned is not None:
        assert response.status_code >= 400, f'a string that is not UTF-8 was accepted at {poisoned}'
    if auth != 'right key' and path not in OPEN_PATHS:
        assert response.status_code == 401, f'{auth} was let through'
    if 400 <= response.status_code < 500:
        error = response.json().get('error')
        assert isinstance(error, dict) and {'message', 'type', 'param', 'code'} <= error.keys(), 'not OpenAI-shaped'
        assert isinstance(error['message'], str) and error['message'] and isinstance(error['type'], str)
        return
    [content_type] = response.headers.get('content-type', [''])
    if content_type.startswith('text/event-stream'):
        assert not response.stream_cut_short, 'the SSE stream was not read to its end'
        events = [line[len('data: '):] for line in response.text.splitlines() if line.startswith('data: ')]
        assert events and events[-1] == '[DONE]', 'the SSE stream did not end with [DONE]'
    elif content_type.startswith('application/x-ndjson'):
        last = json.loads(response.text.splitlines()[-1])
        assert last.get('finish_reason') is not None, 'the /generate stream has no final line'


@pytest.mark.parametrize('method, path, mode', [
    (method, path, mode) for method, path in OPERATIONS
    for mode in ([GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if method == 'POST'
                 else [GenerationMode.POSITIVE])])
def test_fuzzed_requests_get_no_5xx_and_openai_shaped_refusals(api_schema, base, model, method, path, mode):
    operation = api_schema[path][method]
    documented_fields = {name for model in api_schema.raw_schema['components']['schemas'].values()
                         for name in model.get('properties', {})}

    @given(case=operation.as_strategy(generation_mode=mode), auth=AUTHS, name_the_model=st.integers(0, 3).map(bool),
           poison=st.none() | st.tuples(st.integers(0, 1000), st.sampled_from(LONE_SURROGATES)))
    @settings(max_examples=EXAMPLES[method], deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def fuzz(case, auth, name_the_model, poison):
        case.body, poisoned, sent = make_cheap(case.body, path, model, name_the_model), None, {}
        if poison is not None and method == 'POST':
            # sent as is: schemathesis itself cannot validate a body that is not UTF-8
            body, poisoned = with_lone_surrogate(case.body, documented_fields, *poison)
            sent = {'json': body} if poisoned is not None else {}
        response = case.call(base_url=base, headers=AUTH_HEADERS[auth], timeout=REQUEST_TIMEOUT_S, **sent)
        try:
            check_answer(response, path, auth, poisoned)
        except (AssertionError, ValueError) as exc:
            raise AssertionError(f'{exc}: {response.status_code} {response.text[:500]!r}\n'
                                 f'sent {auth}: {response.request.body[:2000]!r}') from exc

    fuzz()


def test_the_server_still_answers_correctly_after_the_fuzzing(base, model):
    client = openai.OpenAI(base_url=f'{base}/v1', api_key=KEY, max_retries=0, timeout=REQUEST_TIMEOUT_S)
    reply = client.chat.completions.create(model=model, messages=[{'role': 'user', 'content': FRANCE}],
                                           max_tokens=16, temperature=0)
    assert 'Paris' in reply.choices[0].message.content
