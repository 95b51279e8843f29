"""Guided requests beside unguided ones on the JAX engine (default model, prefix caching on): 64
requests at once, half guided (JSON schemas and a regex, one shared system prompt that the prefix
cache serves), all greedy, all complete; every guided answer validates, and every unguided answer
equals the one its prompt gets alone. (Sampled guided rows run the same mask: ``test_guided_unit``
checks it, the server test samples.)"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
from test_engine_helpers import run_all, small_default_engine
from transformers import AutoTokenizer

from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import GenerationConfig

EOS = 2
SYSTEM = ('You are a careful assistant. You answer every question briefly and precisely, you never invent facts, '
          'and when you are asked for structured data you give exactly the fields that are asked for, in order.')
QUESTIONS = ['What is the capital of France?', 'Name a prime number.', 'Who wrote Hamlet?', 'Why is the sky blue?']
SCHEMAS = [
    {'type': 'object', 'properties': {'name': {'type': 'string', 'maxLength': 12},
                                      'age': {'type': 'integer', 'minimum': 0, 'maximum': 120}},
     'required': ['name', 'age'], 'additionalProperties': False},
    {'type': 'object', 'properties': {'tags': {'type': 'array', 'items': {'enum': ['a', 'b', 'c']}, 'minItems': 1,
                                               'maxItems': 3}}, 'required': ['tags'], 'additionalProperties': False},
    {'type': 'array', 'items': {'type': 'integer', 'minimum': 0, 'maximum': 9}, 'minItems': 2, 'maxItems': 4},
]
REGEX = r'(yes|no), [a-z]{2,6}\.'


@pytest.fixture(scope='module')
def source():
    return resolve_model(None)


@pytest.fixture(scope='module')
def tokenizer(source):
    return AutoTokenizer.from_pretrained(source.hf_dir)


@pytest.fixture(scope='module')
def engine(source):
    eng = small_default_engine(source, enable_prefix_caching=True)
    yield eng
    eng.close()


def chat(tokenizer, question):
    return tokenizer.apply_chat_template([{'role': 'system', 'content': SYSTEM}, {'role': 'user', 'content': question}],
                                         add_generation_prompt=True, tokenize=True, return_dict=True)['input_ids']


def guided_request(i, tokenizer):
    kind = i % (len(SCHEMAS) + 1)
    if kind == len(SCHEMAS):
        fmt, question = {'type': 'regex_schema', 'regex_schema': REGEX}, 'Is water wet? Say yes or no, and a word.'
    else:
        fmt = {'type': 'json_schema', 'json_schema': {'name': 's', 'schema': SCHEMAS[kind]}}
        question = 'Answer in JSON.'
    gen = GenerationConfig(max_new_tokens=32, stop_token_ids=[EOS], response_format=fmt)
    return EngineRequest(1000 + i, chat(tokenizer, question), gen), kind


def test_half_guided_batch_completes_and_leaves_unguided_answers_as_alone(engine, tokenizer):
    free_gen = GenerationConfig(max_new_tokens=8, stop_token_ids=[EOS])
    free = [EngineRequest(i, chat(tokenizer, QUESTIONS[i % len(QUESTIONS)]), free_gen) for i in range(32)]
    guided = [guided_request(i, tokenizer) for i in range(32)]
    mixed = [r for pair in zip(free, (g for g, _ in guided)) for r in pair]
    before = engine.stats()['prefix_hit_blocks']
    results = run_all(engine, mixed)
    assert engine.stats()['prefix_hit_blocks'] > before          # the shared system prompt came from the cache
    assert all(r.error is None for r in results)
    for (request, kind), result in zip(guided, results[1::2]):
        text = tokenizer.decode(result.tokens)
        assert result.finish_reason == 'stop', text
        if kind == len(SCHEMAS):
            assert re.fullmatch(REGEX, text), text
        else:
            jsonschema.validate(json.loads(text), SCHEMAS[kind])
    alone = [run_all(engine, [EngineRequest(500 + i, chat(tokenizer, q), free_gen)])[0]
             for i, q in enumerate(QUESTIONS)]
    for i, result in enumerate(results[0::2]):
        assert (result.tokens, result.finish_reason) == (alone[i % 4].tokens, alone[i % 4].finish_reason)
