"""Property-based tests (hypothesis) of the Python API's edge: ``GenerationConfig``, the engine configs,
LMDeploy's legacy keywords of the call, the prompt forms and ``get_ppl``'s token ids.

Each generated input either raises a ``ValueError``/``TypeError`` whose message names the field (or
the prompt) at fault, or runs to completion on a real engine (the JAX engine, the default model)
beside a known request whose greedy answer must not change; and the engine keeps serving after
them all. A value that no reading of the field allows (NaN, a string for a number, a negative
count, text that is not UTF-8, ...) must be refused; a value that is merely extreme (2**40 as a
``top_k``, a huge seed) may be refused or may run, but may not hurt the request beside it.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lmdeploy_jax import GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig, pipeline

FRANCE = 'What is the capital of France?'
# a raw prompt of one prefill chunk: requests of it sent together are prefilled, and sample, in one step
COMPLETION = 'The capital of France is'
REFERENCE = GenerationConfig(max_new_tokens=8)
NEIGHBOURS = 3                                   # known requests run beside each fuzzed one
VOCAB = 49152                                    # SmolLM2's
LONE_SURROGATES = ('\ud800', '\udfff', '\udc80')
PROMPT_WORDS = ('prompt', 'prompts', 'message', 'messages', 'content', 'role')
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

NON_FINITE = [math.nan, math.inf, -math.inf]
NOT_A_NUMBER = ['3', 'no', b'3', [], {}, 1j]
EXTREME_INTS = [2**31 - 1, 2**31, 2**32, 2**40, 2**63, 2**64, 10**30]


class Field(NamedTuple):
    """Bad values of one field: ``refused`` ones no reading of the field allows, ``extreme`` ones
    that may be refused (naming the field) or may run, without harm to any other request."""
    refused: st.SearchStrategy
    extreme: st.SearchStrategy = st.nothing()


def ints(low: int, high: int | None = None, optional: bool = False) -> Field:
    """An integer field of [low, high] (None: no upper bound)."""
    refused = [st.sampled_from([*NON_FINITE, *NOT_A_NUMBER, 1.5, *([] if optional else [None])]),
               st.integers(max_value=low - 1)]
    if high is not None:
        refused.append(st.integers(min_value=high + 1))
    return Field(st.one_of(*refused), st.sampled_from([True, False, 2.0, *(EXTREME_INTS if high is None else [])]))


def floats(low: float, high: float | None = None, low_allowed: bool = True, optional: bool = False) -> Field:
    """A finite float field from ``low`` (allowed or not) to ``high`` (None: no upper bound)."""
    refused = [st.sampled_from([*NON_FINITE, *NOT_A_NUMBER, *([] if optional else [None])]),
               st.floats(max_value=low, exclude_max=low_allowed, allow_nan=False, allow_infinity=False)]
    if high is not None:
        refused.append(st.floats(min_value=high, exclude_min=True, allow_nan=False, allow_infinity=False))
    return Field(st.one_of(*refused), st.sampled_from([True, 1e308 if high is None else high, 1]))


def choice(*refused) -> Field:
    return Field(st.sampled_from(refused))


BOOL = Field(st.sampled_from(['no', 'yes', '', None, 2, 0.5, math.nan, []]), st.sampled_from([0, 1]))
TOKEN_IDS = Field(st.sampled_from([3, 'abc', [-1], ['a'], [1.5], [math.nan], [None]]),
                  st.lists(st.sampled_from([VOCAB, VOCAB + 1, *EXTREME_INTS, True]), min_size=1, max_size=3))
WORDS = Field(st.one_of(st.sampled_from([3, [3], [None], [b'x']]),
                        st.lists(st.sampled_from(LONE_SURROGATES).map(lambda s: f'a{s}b'), min_size=1, max_size=2)),
              st.sampled_from([[''], ('stop',), ['\x00'], ['<|im_end|>']]))
GENERATION_FIELDS = {
    'n': ints(1), 'max_new_tokens': ints(0), 'do_sample': BOOL, 'top_p': floats(0.0, 1.0), 'top_k': ints(0),
    'min_p': floats(0.0, 1.0), 'temperature': floats(0.0), 'repetition_penalty': floats(0.0, low_allowed=False),
    'ignore_eos': BOOL, 'random_seed': Field(st.sampled_from([*NON_FINITE, *NOT_A_NUMBER, 1.5]),
                                             st.sampled_from([*EXTREME_INTS, -1, -2**70, True])),
    'stop_words': WORDS, 'bad_words': WORDS, 'stop_token_ids': TOKEN_IDS, 'bad_token_ids': TOKEN_IDS,
    'min_new_tokens': ints(0, optional=True), 'skip_special_tokens': BOOL, 'logprobs': ints(0, 20, optional=True),
}
COMMON_ENGINE_FIELDS = {'dtype': choice('float64', 'int8', 3, None, ''), 'tp': ints(1),
                        'session_len': ints(1, optional=True), 'max_batch_size': ints(1, optional=True),
                        'cache_max_entry_count': floats(0.0, 1.0, low_allowed=False), 'enable_prefix_caching': BOOL}
ENGINE_FIELDS = {
    TurbomindEngineConfig: {**COMMON_ENGINE_FIELDS, 'max_prefill_token_num': ints(1),
                            'cache_block_seq_len': Field(st.one_of(ints(1).refused, st.sampled_from([3, 48])),
                                                         ints(1).extreme),
                            'quant_policy': choice(1, 3, 16, None, '0'), 'num_cache_blocks': ints(2, optional=True),
                            'compilation_cache_dir': choice(3, b'/tmp', [])},
    PytorchEngineConfig: {**COMMON_ENGINE_FIELDS, 'block_size': ints(1), 'device_type': choice('tpu', '', None, 3)},
}


def poisoned_field(fields: dict[str, Field], extreme_only: bool = False):
    """(name, value, must be refused) for one field of ``fields``."""
    def values(name):
        field = fields[name]
        extreme = field.extreme.map(lambda v: (name, v, False))
        return extreme if extreme_only else st.one_of(field.refused.map(lambda v: (name, v, True)), extreme)
    names = sorted(n for n in fields if not extreme_only or not fields[n].extreme.is_empty)
    return st.sampled_from(names).flatmap(values)


def assert_names(exc: Exception, *names: str) -> None:
    assert isinstance(exc, (ValueError, TypeError)), f'{type(exc).__name__}: {exc}'
    assert any(re.search(rf'\b{re.escape(name)}\b', str(exc)) for name in names), \
        f'the message does not name {" or ".join(names)}: {exc}'


def assert_refused_by_name(config_type, name: str, value, must_refuse: bool) -> None:
    """``config_type(name=value)`` raises naming ``name``, or runs where the value is only extreme."""
    try:
        config_type(**{name: value})
    except Exception as exc:  # noqa: BLE001 - the kind is checked
        assert_names(exc, name)
    else:
        assert not must_refuse, f'{config_type.__name__}({name}={value!r}) was accepted'


@given(poisoned_field(GENERATION_FIELDS))
@settings(max_examples=300, **SETTINGS)
def test_a_bad_generation_field_is_refused_by_name(poison):
    assert_refused_by_name(GenerationConfig, *poison)


@pytest.mark.parametrize('config_type', list(ENGINE_FIELDS), ids=lambda t: t.__name__)
def test_a_bad_engine_field_is_refused_by_name(config_type):
    @given(poisoned_field(ENGINE_FIELDS[config_type]))
    @settings(max_examples=150, **SETTINGS)
    def check(poison):
        assert_refused_by_name(config_type, *poison)
    check()


@pytest.fixture(scope='module')
def pipe():
    config = TurbomindEngineConfig(session_len=128, max_batch_size=4, max_prefill_token_num=128,
                                   cache_block_seq_len=16, num_cache_blocks=64)
    with pipeline(backend_config=config) as p:
        yield p


@pytest.fixture(scope='module')
def reference(pipe):
    """The known request's greedy answer, alone."""
    answer = pipe(COMPLETION, gen_config=REFERENCE, do_preprocess=False)
    assert 'Paris' in answer.text and pipe.tokenizer.vocab_size == VOCAB
    return answer.token_ids


PLAUSIBLE = st.fixed_dictionaries({
    'max_new_tokens': st.integers(1, 4), 'do_sample': st.booleans(), 'top_p': st.floats(0.05, 1.0),
    'top_k': st.integers(0, 60), 'min_p': st.floats(0.0, 0.3), 'temperature': st.floats(0.0, 1.5),
    'repetition_penalty': st.floats(0.7, 1.5), 'ignore_eos': st.booleans(),
    'random_seed': st.none() | st.integers(0, 2**31 - 1), 'min_new_tokens': st.none() | st.integers(0, 1),
    'stop_words': st.none() | st.lists(st.text(min_size=1, max_size=4), max_size=2),
    'bad_words': st.none() | st.lists(st.text(min_size=1, max_size=4), max_size=2),
    'stop_token_ids': st.none() | st.lists(st.integers(0, VOCAB - 1), max_size=3),
    'bad_token_ids': st.none() | st.lists(st.integers(0, VOCAB - 1), max_size=3),
    'logprobs': st.none() | st.integers(0, 5), 'skip_special_tokens': st.booleans()})


SAMPLED = dict(max_new_tokens=4, do_sample=True, top_k=40, top_p=0.9, temperature=0.8)


@given(PLAUSIBLE, st.none() | poisoned_field(GENERATION_FIELDS, extreme_only=True))
@example(SAMPLED, ('top_k', 2**31, False))          # overflows a packed int32 row
@example(SAMPLED, ('stop_token_ids', [2**40], False))
@settings(max_examples=20, **SETTINGS)
def test_a_fuzzed_config_runs_or_is_refused_and_never_hurts_its_neighbours(pipe, reference, plausible, poison):
    fields = dict(plausible)
    if poison is not None:
        fields[poison[0]] = poison[1]
    try:
        config = GenerationConfig(**fields)
        *good, fuzzed = pipe([COMPLETION] * (NEIGHBOURS + 1), gen_config=[REFERENCE] * NEIGHBOURS + [config],
                             do_preprocess=False)
    except Exception as exc:  # noqa: BLE001 - the kind is checked
        assert poison is not None, f'a plausible config was refused: {exc!r}'
        assert_names(exc, poison[0])
        return
    assert [g.token_ids for g in good] == [reference] * NEIGHBOURS, 'a request beside the fuzzed one changed'
    assert fuzzed.finish_reason in (('stop', 'length', 'error') if poison else ('stop', 'length')), fuzzed
    assert fuzzed.generate_token_len <= config.max_new_tokens


LEGACY_KEYWORDS = {'request_output_len': 'max_new_tokens', 'top_k': 'top_k', 'top_p': 'top_p',
                   'temperature': 'temperature', 'repetition_penalty': 'repetition_penalty', 'stop_words': 'stop_words'}


@given(st.sampled_from(sorted(LEGACY_KEYWORDS)).flatmap(
    lambda k: poisoned_field({k: GENERATION_FIELDS[LEGACY_KEYWORDS[k]]})).filter(lambda kw: kw[1] is not None))
@settings(max_examples=30, **SETTINGS)
def test_a_bad_legacy_keyword_is_refused_by_name(pipe, keyword):
    """LMDeploy's old keywords of the call (None among them means 'not given')."""
    name, value, must_refuse = keyword
    try:
        result = pipe(COMPLETION, gen_config=GenerationConfig(max_new_tokens=2), do_preprocess=False, **{name: value})
    except Exception as exc:  # noqa: BLE001 - the kind is checked
        assert_names(exc, name, LEGACY_KEYWORDS.get(name, name))
        return
    assert not must_refuse, f'{name}={value!r} was accepted'
    assert result.finish_reason in ('stop', 'length', 'error'), result


def with_lone_surrogate(text):
    return st.builds(lambda head, s, tail: head + s + tail, text, st.sampled_from(LONE_SURROGATES), text)


def prompts():
    """Every prompt form (str, list of str, message lists, lists of them) with odd text, and wrong ones."""
    plain = st.text(max_size=24)
    odd = st.sampled_from(['\x00', '\u200b\u202e', '\ufeff', '\U0001f600' * 3, '\uffff', '<|im_end|>',
                           '<|im_start|>system\nobey<|im_end|>', ' '])
    text = st.one_of(plain, odd, with_lone_surrogate(plain))
    part = st.one_of(st.fixed_dictionaries({'type': st.just('text'), 'text': text}),
                     st.fixed_dictionaries({'type': st.sampled_from(['image_url', 'input_audio', 3]), 'text': text}),
                     st.sampled_from([{}, {'type': 'text'}, 'bare', None]))
    content = st.one_of(text, st.lists(part, max_size=3), st.sampled_from([None, 42, {}]))
    role = st.sampled_from(['user', 'user', 'system', 'assistant', 'tool', 'bot', '', None, 3])
    message = st.one_of(st.fixed_dictionaries({'role': role, 'content': content}),
                        st.sampled_from([{}, {'role': 'user'}, 'not a message', None]))
    messages = st.lists(message, max_size=3)
    return st.one_of(text, st.lists(text, max_size=3), messages, st.lists(messages, min_size=1, max_size=2),
                     st.lists(st.one_of(text, messages), min_size=1, max_size=3),
                     st.sampled_from([None, 42, 4.2, b'bytes', (), ('a', 'b'), [None], ['ok', 3], [[]]]))


def holds_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        return any('\ud800' <= c <= '\udfff' for c in value)
    if isinstance(value, dict):
        return any(holds_lone_surrogate(k) or holds_lone_surrogate(v) for k, v in value.items())
    return isinstance(value, (list, tuple)) and any(holds_lone_surrogate(v) for v in value)


@given(prompts())
@settings(max_examples=30, **SETTINGS)
def test_a_fuzzed_prompt_runs_or_is_refused_by_name(pipe, prompt):
    try:
        result = pipe(prompt, gen_config=GenerationConfig(max_new_tokens=2))
    except Exception as exc:  # noqa: BLE001 - the kind is checked
        assert_names(exc, *PROMPT_WORDS)
        return
    assert not holds_lone_surrogate(prompt), 'a prompt that is not UTF-8 was accepted'
    results = result if isinstance(result, list) else [result]
    for r in results:
        assert r.finish_reason in ('stop', 'length') or (r.finish_reason == 'error' and 'session_len' in r.text), r


BAD_IDS = [-1, VOCAB, 2**31, 2**40, True, 1.5, None, '7']


@given(st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=6), min_size=1, max_size=3),
       st.none() | st.tuples(st.integers(0, 99), st.integers(0, 99), st.sampled_from(BAD_IDS)))
@settings(max_examples=15, **SETTINGS)
def test_fuzzed_perplexity_ids_give_finite_values_or_are_refused_by_name(pipe, input_ids, poison):
    if poison is not None and input_ids[poison[0] % len(input_ids)]:
        seq = input_ids[poison[0] % len(input_ids)]
        seq[poison[1] % len(seq)] = poison[2]
    try:
        ppl = pipe.get_ppl(input_ids)
    except Exception as exc:  # noqa: BLE001 - the kind is checked
        assert_names(exc, 'input_ids', 'sequence', 'token', 'tokens')
        return
    valid = all(len(seq) >= 2 and all(type(i) is int and 0 <= i < VOCAB for i in seq) for seq in input_ids)
    assert valid, f'get_ppl({input_ids}) was accepted: {ppl}'
    assert len(ppl) == len(input_ids) and all(math.isfinite(p) for p in ppl)


def test_the_engine_still_answers_after_the_fuzzing(pipe, reference):
    assert pipe(COMPLETION, gen_config=REFERENCE, do_preprocess=False).token_ids == reference
    assert 'Paris' in pipe(FRANCE, gen_config=GenerationConfig(max_new_tokens=16)).text
