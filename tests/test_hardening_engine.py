"""Hardening of the engines and the Python API on the real default model (SmolLM2-135M-Instruct,
CPU): one bad request never fails the requests beside it, every setting is bounded where it is
declared, text must be UTF-8, ids must be in the vocabulary, and a closed pipeline refuses calls."""
from __future__ import annotations

import asyncio
import math
import threading

import pytest
from test_engine_helpers import Result, run_all, small_default_engine

from lmdeploy_jax import ChatTemplateConfig, GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig, pipeline
from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.engine.sampler import host_sampling_params
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import INT32_MAX, MAX_BATCH_SIZE
from lmdeploy_jax.pytorch.engine import PytorchEngine

SURROGATE = '\ud800'     # valid in JSON as an escape, not encodable as UTF-8


@pytest.fixture(scope='module')
def source():
    return resolve_model(None)


@pytest.fixture(scope='module')
def jax_engine(source):
    eng = small_default_engine(source)
    yield eng
    eng.close()


@pytest.fixture(scope='module')
def torch_engine(source):
    eng = PytorchEngine(source, PytorchEngineConfig(device_type='cpu', session_len=256))
    yield eng
    eng.close()


@pytest.fixture(scope='module', params=['jax', 'torch'])
def engine(request):
    return request.getfixturevalue(f'{request.param}_engine')


@pytest.fixture(scope='module')
def pipe():
    with pipeline(backend='pytorch', backend_config=PytorchEngineConfig(device_type='cpu', session_len=512)) as p:
        yield p


# ---- validation where the settings are declared ----

@pytest.mark.parametrize('field,value', [
    ('top_k', 2 ** 31), ('top_k', True), ('max_new_tokens', 2 ** 31), ('min_new_tokens', 2 ** 40),
    ('stop_token_ids', [5, 2 ** 40]), ('bad_token_ids', [2 ** 31]), ('bad_token_ids', [-1]),
    ('temperature', math.inf), ('temperature', 3.0), ('top_p', math.nan), ('min_p', -math.inf),
    ('repetition_penalty', math.inf), ('do_sample', 'no'), ('do_sample', 1), ('ignore_eos', 'yes'),
    ('skip_special_tokens', None), ('n', 65), ('random_seed', 2 ** 64), ('random_seed', 1.5), ('logprobs', True),
    ('stop_words', ['ok', 'a' + SURROGATE]), ('bad_words', [SURROGATE])])
def test_generation_config_refuses_out_of_bounds_values(field, value):
    with pytest.raises(ValueError, match=rf'^{field}\b'):
        GenerationConfig(**{field: value})


def test_the_largest_allowed_values_pack_into_the_sampler_arrays():
    """The bounds of GenerationConfig keep every packed value inside its array's dtype."""
    gen = GenerationConfig(do_sample=True, top_k=INT32_MAX, min_new_tokens=INT32_MAX, max_new_tokens=INT32_MAX,
                           stop_token_ids=[INT32_MAX], bad_token_ids=[0, INT32_MAX], temperature=2.0,
                           repetition_penalty=1e4, random_seed=2 ** 64 - 1)
    sp = host_sampling_params([(gen, gen.random_seed & 0xFFFFFFFF, 0)], 2)
    assert sp.top_k[0] == sp.min_new[0] == sp.stop_ids[0, 0] == sp.bad_ids[0, 1] == INT32_MAX
    assert all(math.isfinite(float(x[0])) for x in (sp.temperature, sp.repetition_penalty))


@pytest.mark.parametrize('cls,field,value', [
    (TurbomindEngineConfig, 'max_batch_size', MAX_BATCH_SIZE + 1), (TurbomindEngineConfig, 'session_len', 2 ** 31),
    (TurbomindEngineConfig, 'tp', True), (TurbomindEngineConfig, 'cache_max_entry_count', math.nan),
    (TurbomindEngineConfig, 'enable_prefix_caching', 'yes'), (TurbomindEngineConfig, 'quant_policy', False),
    (TurbomindEngineConfig, 'max_prefill_token_num', 2 ** 40), (TurbomindEngineConfig, 'num_cache_blocks', 2.5),
    (TurbomindEngineConfig, 'compilation_cache_dir', 7), (PytorchEngineConfig, 'block_size', 2 ** 31),
    (PytorchEngineConfig, 'enable_prefix_caching', 1), (PytorchEngineConfig, 'cache_max_entry_count', math.inf)])
def test_engine_configs_refuse_out_of_bounds_values(cls, field, value):
    with pytest.raises(ValueError, match=rf'^{field}\b'):
        cls(**{field: value})


@pytest.mark.parametrize('field,kwargs', [
    ('backend_config', dict(backend_config={'session_len': 64})),
    ('instance_num', dict(instance_num=True, backend_config={'session_len': 64}))])
def test_pipeline_refuses_arguments_of_the_wrong_kind(field, kwargs):
    with pytest.raises(ValueError, match=rf'^{field}\b'):
        pipeline(**kwargs)


# ---- isolation inside the engines ----

def _poisoned(field: str, value, **settings) -> GenerationConfig:
    """A config given a bad value after it was validated, as no caller of the API can build one."""
    gen = GenerationConfig(max_new_tokens=8, **settings)
    setattr(gen, field, value)
    return gen


def _prompt(rng, n):
    return [int(i) for i in rng.integers(10, 49000, n)]


def _submit_together(engine, requests: list[EngineRequest]) -> list[Result]:
    """Submit while the engine thread is held in a callback, so it takes all of them in one go
    (the same step, on the JAX engine)."""
    release, held = threading.Event(), threading.Event()

    def hold(out):
        if out.finish_reason is not None:
            held.set()
            release.wait(60)
    engine.submit(EngineRequest(999, [1, 2, 3], GenerationConfig(max_new_tokens=1)), hold)
    assert held.wait(300)
    results = [Result() for _ in requests]
    for req, res in zip(requests, results):
        engine.submit(req, res)
    release.set()
    return [r.wait() for r in results]


def test_a_poisoned_request_fails_alone_beside_good_ones(engine, rng):
    """Requests whose settings cannot be packed (or are out of the vocabulary) are refused alone with
    'error' naming the field; the good ones of the same batch give the tokens they give alone."""
    vocab = engine.vocab_size
    good = [GenerationConfig(max_new_tokens=8)] * 3 + [
        GenerationConfig(max_new_tokens=8, do_sample=True, random_seed=int(rng.integers(1 << 30)))]
    poisons = {'top_k': _poisoned('top_k', 2 ** 31, do_sample=True),
               'min_new_tokens': _poisoned('min_new_tokens', 2 ** 40),
               'stop_token_ids': _poisoned('stop_token_ids', [2, 2 ** 40]),
               'bad_token_ids': _poisoned('bad_token_ids', [vocab + 7]),
               'do_sample': _poisoned('do_sample', 'no'),
               'temperature': _poisoned('temperature', math.nan, do_sample=True)}
    prompts = [_prompt(rng, int(rng.integers(5, 40))) for _ in good]
    solo = [run_all(engine, [EngineRequest(100 + i, p, g)])[0] for i, (p, g) in enumerate(zip(prompts, good))]
    assert all(r.finish_reason == 'length' and len(r.tokens) == 8 for r in solo)

    requests = [EngineRequest(200 + i, p, g) for i, (p, g) in enumerate(zip(prompts, good))]
    requests[2:2] = [EngineRequest(300 + i, _prompt(rng, 9), g) for i, g in enumerate(poisons.values())]
    results = _submit_together(engine, requests)
    by_session = {req.session_id: res for req, res in zip(requests, results)}
    for i, alone in enumerate(solo):
        together = by_session[200 + i]
        assert together.finish_reason == 'length' and together.tokens == alone.tokens, together.error
    for i, field in enumerate(poisons):
        bad = by_session[300 + i]
        assert bad.finish_reason == 'error' and field in bad.error and not bad.tokens, (field, bad.error)
    assert engine.stats()['running'] == 0


def test_a_vanishing_temperature_decodes_greedily(engine, rng):
    """A temperature too small to divide the logits by in float32 gives the greedy tokens, not
    tokens drawn from overflowed logits."""
    prompt = _prompt(rng, 12)
    greedy = run_all(engine, [EngineRequest(500, prompt, GenerationConfig(max_new_tokens=8))])[0]
    tiny = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1e-38,
                            random_seed=int(rng.integers(1 << 30)))
    assert tiny.greedy
    sampled = run_all(engine, [EngineRequest(501, prompt, tiny)])[0]
    assert sampled.finish_reason == 'length' and sampled.tokens == greedy.tokens


def test_malformed_requests_fail_alone(engine, rng):
    """No generation config, and a session id that cannot key a session (the JAX engine's scheduler
    raises on it): each finishes with 'error', the request beside them runs."""
    results = _submit_together(engine, [EngineRequest(400, _prompt(rng, 6), None),
                                        EngineRequest([401], _prompt(rng, 6), GenerationConfig(max_new_tokens=3)),
                                        EngineRequest(402, _prompt(rng, 6), GenerationConfig(max_new_tokens=3))])
    assert results[0].finish_reason == 'error' and 'gen_config' in results[0].error
    assert results[1].finish_reason == 'error' and 'unhashable' in results[1].error
    assert results[2].finish_reason == 'length' and len(results[2].tokens) == 3


@pytest.mark.parametrize('seqs', [[[1, 2 ** 40]], [[5, 6, 7], [1, 49152]], [[-1, 5]], [[3, 4.0]]])
def test_get_ppl_refuses_ids_outside_the_vocabulary(engine, seqs):
    with pytest.raises(ValueError, match='vocabulary'):
        engine.get_ppl(seqs)
    assert math.isfinite(engine.get_ppl([[1, 2, 3]])[0])


# ---- the Python API ----

def test_pipeline_get_ppl_refuses_ids_outside_the_vocabulary(pipe):
    for ids in ([[1, 2 ** 40]], [7, pipe.vocab_size]):
        with pytest.raises(ValueError, match='vocabulary'):
            pipe.get_ppl(ids)


@pytest.mark.parametrize('field,settings', [
    ('stop_token_ids', dict(stop_token_ids=[49152])), ('bad_token_ids', dict(bad_token_ids=[3, 10 ** 6])),
    ('top_k', dict(top_k=49153))])
def test_pipeline_bounds_ids_and_top_k_by_the_vocabulary(pipe, field, settings):
    assert pipe.vocab_size == 49152
    with pytest.raises(ValueError, match=rf'^{field}\b'):
        pipe('Hi', gen_config=GenerationConfig(max_new_tokens=2, **settings))


def test_generate_refuses_input_ids_outside_the_vocabulary(pipe):
    async def run(ids):
        return [out async for out in pipe.generate(None, 4321, GenerationConfig(max_new_tokens=2), input_ids=ids)]
    with pytest.raises(ValueError, match=r'^input_ids\[1\]'):
        asyncio.run(run([1, 49152]))
    assert asyncio.run(run([1, 2, 3]))[-1].generate_token_len == 2


@pytest.mark.parametrize('call,field', [
    (lambda p: p(SURROGATE), r'prompts\[0\]'),
    (lambda p: p(['fine', 'a' + SURROGATE + 'b']), r'prompts\[1\]'),
    (lambda p: p([{'role': 'user', 'content': 'x' + SURROGATE}]), r'prompts\[0\]\[0\]\.content'),
    (lambda p: p([[{'role': 'system', 'content': 'Be brief.'},
                   {'role': 'user', 'content': [{'type': 'text', 'text': SURROGATE}]}]]),
     r'prompts\[0\]\[1\]\.content\[0\]\.text'),
    (lambda p: p('Hi', stop_words=[SURROGATE]), r'stop_words\[0\]'),
    (lambda p: list(p.stream_infer(['Hi', SURROGATE])), r'prompts\[1\]'),
    (lambda p: p.chat('Hi ' + SURROGATE), 'prompt'),
    (lambda p: asyncio.run(anext(p.generate(SURROGATE, 4322))), 'messages'),
])
def test_text_that_is_not_utf8_is_refused_naming_the_field(pipe, call, field):
    with pytest.raises(ValueError, match=rf'^{field} is not valid UTF-8'):
        call(pipe)
    assert pipe.engine.stats()['running'] == 0                # nothing was queued
    assert pipe('Hi', gen_config=GenerationConfig(max_new_tokens=2)).generate_token_len == 2


def test_chat_template_config_text_must_be_utf8():
    with pytest.raises(ValueError, match=r'^chat_template_config\.system is not valid UTF-8'):
        pipeline(chat_template_config=ChatTemplateConfig('mine', system=SURROGATE))


def test_a_closed_pipeline_refuses_every_call():
    pipe = pipeline(backend='pytorch', backend_config=PytorchEngineConfig(device_type='cpu', session_len=128))
    assert pipe('Hi', gen_config=GenerationConfig(max_new_tokens=2)).generate_token_len == 2
    pipe.close()
    threads = set(threading.enumerate())
    calls = [lambda: pipe('Hi'), lambda: pipe.batch_infer(['Hi', 'there']), lambda: list(pipe.stream_infer('Hi')),
             lambda: pipe.chat('Hi'), lambda: pipe.session(), lambda: pipe.get_ppl([1, 2, 3]),
             lambda: pipe.stop_session(1), lambda: pipe.end_session(1),
             lambda: asyncio.run(anext(pipe.generate('Hi', 5)))]
    for call in calls:
        with pytest.raises(RuntimeError, match='the pipeline is closed'):
            call()
    assert set(threading.enumerate()) <= threads            # nothing restarted a thread
    pipe.close()                                            # closing again is harmless
