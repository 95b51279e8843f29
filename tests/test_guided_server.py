"""Guided decoding end to end: the server on the default model with the official ``openai`` client.

20 JSON schemas (nested objects, arrays, enums, bounded numbers, required fields), a regex and
enforced tool choices, each asked whole and streamed at once (greedy): every answer parses and
validates, and the stream's text equals the whole answer's. Before guided decoding the server
refused ``response_format``, and a forced ``tool_choice`` could come back as plain text.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from test_server import ENGINE_FLAGS, running_server
from test_tools import TIME, WEATHER, streamed_answer
from test_unsupported_args import refused_chat

MAX_TOKENS = 64


def obj(required=None, **properties):
    return {'type': 'object', 'properties': properties, 'required': list(required or properties),
            'additionalProperties': False}


def string(n=10, **kw):
    return {'type': 'string', 'maxLength': n, **kw}


def integer(low=0, high=99):
    return {'type': 'integer', 'minimum': low, 'maximum': high}


SCHEMAS = [
    ('a person', obj(name=string(12), age=integer(0, 120))),
    ('a traffic light', obj(color={'enum': ['red', 'amber', 'green']})),
    ('a yes/no answer', obj(ok={'type': 'boolean'})),
    ('the weather', obj(celsius={'type': 'number', 'minimum': -50, 'maximum': 60}, city=string(12))),
    ('exam scores', obj(scores={'type': 'array', 'items': integer(1, 10), 'minItems': 1, 'maxItems': 3})),
    ('an address', obj(address=obj(city=string(12), zip={'type': 'string', 'pattern': '^[0-9]{5}$'}))),
    ('an order', obj(items={'type': 'array', 'minItems': 1, 'maxItems': 2,
                            'items': obj(sku=string(6), qty=integer(1, 9))})),
    ('three fruits', {'type': 'array', 'items': string(8), 'minItems': 2, 'maxItems': 3}),
    ('a note that may be missing', obj(note={'type': ['string', 'null'], 'maxLength': 10})),
    ('a versioned label', obj(version={'const': 2}, label=string(8))),
    ('a digit or a word', obj(value={'anyOf': [integer(0, 9), string(5)]})),
    ('a nested counter', obj(a=obj(b=obj(c=integer(0, 99))))),
    ('a price', obj(price={'type': 'number', 'exclusiveMinimum': 0, 'maximum': 1000})),
    ('a level', obj(level={'type': 'integer', 'enum': [1, 2, 3]})),
    ('an airport code', obj(code={'type': 'string', 'pattern': '^[A-Z]{3}-[0-9]{2}$'})),
    ('a book', obj(title=string(12), pages=integer(1, 999), available={'type': 'boolean'})),
    ('work days', obj(days={'type': 'array', 'items': {'enum': ['mon', 'tue', 'wed']}, 'minItems': 1,
                            'maxItems': 3})),
    ('a point', obj(['x'], x=integer(-9, 9), y=integer(-9, 9))),
    ('a 2x2 grid', obj(grid={'type': 'array', 'minItems': 2, 'maxItems': 2,
                             'items': {'type': 'array', 'minItems': 2, 'maxItems': 2, 'items': integer(0, 9)}})),
    ('a job status', obj(status={'enum': ['ok', 'fail']}, count=integer(0, 5),
                         tags={'type': 'array', 'items': string(6), 'maxItems': 2})),
]
REGEX = r'[A-Z][a-z]{2,8} [0-9]{1,3}'


@pytest.fixture(scope='module')
def client():
    with running_server(*ENGINE_FLAGS, '--chat-template', 'qwen') as base:
        client = openai.OpenAI(base_url=f'{base}/v1', api_key='unused', max_retries=0, timeout=300)
        yield client, client.models.list().data[0].id


def ask(client, content, stream, **kwargs):
    """(text, tool calls as (name, arguments), finish reason) of a greedy answer, whole or streamed."""
    client, model = client
    kwargs = dict(model=model, messages=[{'role': 'user', 'content': content}], max_tokens=MAX_TOKENS,
                  temperature=0, **kwargs)
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return choice.message.content or '', calls, choice.finish_reason
    return streamed_answer(client.chat.completions.create(**kwargs, stream=True))


def ask_all(client, asks):
    """Every (content, kwargs) asked whole and streamed, all at once: [(whole, streamed)]."""
    with ThreadPoolExecutor(2 * len(asks)) as pool:
        futures = [(pool.submit(ask, client, content, False, **kw), pool.submit(ask, client, content, True, **kw))
                   for content, kw in asks]
        return [(whole.result(), streamed.result()) for whole, streamed in futures]


def json_format(schema):
    return {'type': 'json_schema', 'json_schema': {'name': 'answer', 'schema': schema}}


def test_twenty_schemas_and_a_regex_give_valid_answers_whole_and_streamed(client):
    asks = [(f'Give {what} as JSON.', {'response_format': json_format(schema)}) for what, schema in SCHEMAS]
    asks.append(('Name a city and a number.', {'response_format': {'type': 'regex_schema', 'regex_schema': REGEX}}))
    results = ask_all(client, asks)
    for (what, schema), (whole, streamed) in zip(SCHEMAS, results):
        assert streamed == whole, what
        text, calls, reason = whole
        assert reason == 'stop' and not calls, (what, text)
        jsonschema.validate(json.loads(text), schema)
    whole, streamed = results[-1]
    assert streamed == whole and whole[2] == 'stop' and re.fullmatch(REGEX, whole[0]), whole


def test_a_forced_tool_choice_gives_a_call_whose_arguments_validate(client):
    named = {'type': 'function', 'function': {'name': 'get_weather'}}
    asks = [('What is the weather in Paris?', {'tools': [WEATHER, TIME], 'tool_choice': named}),
            ('What time is it?', {'tools': [WEATHER, TIME], 'tool_choice': 'required'})]
    results = ask_all(client, asks)
    for (_, kw), (whole, streamed) in zip(asks, results):
        assert streamed == whole
        text, [(name, arguments)], reason = whole
        assert text == '' and reason == 'tool_calls'
        if kw['tool_choice'] != 'required':
            assert name == 'get_weather'
        [tool] = [t for t in (WEATHER, TIME) if t['function']['name'] == name]
        jsonschema.validate(json.loads(arguments), tool['function']['parameters'])


def test_n_sampled_choices_each_follow_the_schema(client):
    client, model = client
    what, schema = SCHEMAS[0]
    resp = client.chat.completions.create(model=model, messages=[{'role': 'user', 'content': f'Give {what} as JSON.'}],
                                          max_tokens=MAX_TOKENS, n=2, temperature=1.0, seed=7,
                                          response_format=json_format(schema))
    assert len(resp.choices) == 2
    for choice in resp.choices:
        assert choice.finish_reason == 'stop'
        jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize('fields, param, words', [
    ({'response_format': {'type': 'yaml'}}, 'response_format', "must be a dict whose type is one of"),
    ({'response_format': {'type': 'json_schema', 'json_schema': {'name': 'x'}}}, 'response_format',
     "with a 'schema'"),
    ({'response_format': {'type': 'json_object'}, 'tools': [TIME], 'tool_choice': 'required'}, 'response_format',
     'cannot be combined'),
    ({'response_format': json_format({'type': 'object', 'properties': {'a': {'$ref': '#/nowhere'}}})}, None,
     'cannot compile the JSON schema')])
def test_a_response_format_that_cannot_be_served_is_a_400(client, fields, param, words):
    error = refused_chat(*client, extra_body=fields)
    assert error['param'] == param and words in error['message'], error
