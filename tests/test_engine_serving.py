"""The JAX engine end to end on a tiny random Llama (float32, CPU), against transformers: greedy
tokens, concurrency, preemption, prefix caching, sessions, cancel, errors, get_ppl, token_states, and no
compilation after warm-up. The module's engine runs mixed steps (``enable_mixed_chunk``): prompts
arriving while others decode are prefilled beside their decode tokens."""
from __future__ import annotations

import time

import jax
import numpy as np
import pytest
import torch
from test_engine_helpers import Result, run_all
from transformers import LlamaConfig, LlamaForCausalLM

from lmdeploy_jax.checkpoint.source import ModelSource
from lmdeploy_jax.engine import JaxEngine
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import GenerationConfig, TurbomindEngineConfig

VOCAB = 320
SESSION = 128
BUCKETS = dict(decode_batch=[8], prefill_tokens=[32], prefill_batch=[1, 8])


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.2,
                         max_position_embeddings=SESSION, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    hf = LlamaForCausalLM(config).float().eval()
    path = tmp_path_factory.mktemp('tiny_llama')
    hf.save_pretrained(path)
    return ModelSource(str(path), 'tiny-llama'), hf


@pytest.fixture(scope='module')
def engine(tiny):
    config = TurbomindEngineConfig(session_len=SESSION, max_batch_size=8, cache_block_seq_len=16,
                                   num_cache_blocks=128, max_prefill_token_num=256, enable_prefix_caching=True,
                                   enable_mixed_chunk=True)
    eng = JaxEngine(tiny[0], config, **BUCKETS)
    yield eng
    eng.close()


def ids(rng, n):
    return rng.integers(0, VOCAB, n).tolist()


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def greedy(n, **kw):
    return GenerationConfig(max_new_tokens=n, **kw)


def test_greedy_matches_transformers(engine, tiny, rng):
    prompts = [ids(rng, n) for n in (3, 17, 40, 70)]       # 40 and 70 take several prefill chunks
    results = run_all(engine, [EngineRequest(i, p, greedy(24)) for i, p in enumerate(prompts)])
    for p, r in zip(prompts, results):
        assert r.finish_reason == 'length'
        assert r.tokens == hf_greedy(tiny[1], p, 24)


def run_staggered(engine, first: list[EngineRequest], later: list[EngineRequest]) -> list[Result]:
    """``first`` submitted, then ``later`` once every one of ``first`` has a token (is decoding);
    asserts that some step mixed the decoding rows with the later prompts. Returns every result."""
    mixed = engine.stats()['mixed_steps']
    results = [Result() for _ in first + later]
    for req, res in zip(first, results):
        engine.submit(req, res)
    deadline = time.monotonic() + 60
    while not all(res.tokens for res in results[:len(first)]):
        assert time.monotonic() < deadline, 'the first requests did not start'
        time.sleep(0.001)
    for req, res in zip(later, results[len(first):]):
        engine.submit(req, res)
    results = [res.wait() for res in results]
    assert engine.stats()['mixed_steps'] > mixed
    return results


def test_staggered_prompts_ride_with_decoding_rows_and_match_transformers(engine, tiny, rng):
    """Prompts arrive while three rows decode: they are prefilled in mixed steps (one of 70 tokens
    in three chunks), and every request's greedy tokens equal transformers' for it alone."""
    first = [EngineRequest(300 + i, ids(rng, n), greedy(90)) for i, n in enumerate((4, 11, 20))]
    later = [EngineRequest(310 + i, ids(rng, n), greedy(16)) for i, n in enumerate((70, 33, 5, 17))]
    results = run_staggered(engine, first, later)
    for req, res in zip(first + later, results):
        assert res.finish_reason == 'length'
        assert res.tokens == hf_greedy(tiny[1], req.input_ids, req.gen_config.max_new_tokens)


def test_sampling_in_mixed_steps_equals_sampling_alone(engine, rng):
    """A seeded sampled request with penalties, masks and logprobs takes the same tokens and
    logprobs when its tokens are sampled in mixed steps (prompts arriving while it decodes) as
    when it runs alone in decode calls."""
    gen = GenerationConfig(max_new_tokens=40, do_sample=True, temperature=1.3, top_k=50, top_p=0.95, min_p=0.02,
                           repetition_penalty=1.3, bad_token_ids=ids(rng, 4), logprobs=3, min_new_tokens=40,
                           random_seed=int(rng.integers(1 << 30)))
    prompt = ids(rng, 6)
    alone = run_all(engine, [EngineRequest(400, prompt, gen)])[0]
    later = [EngineRequest(401 + i, ids(rng, n), greedy(4)) for i, n in enumerate((60, 25, 40))]
    mixed = run_staggered(engine, [EngineRequest(405, prompt, gen)], later)[0]
    assert mixed.tokens == alone.tokens and len(mixed.logprobs) == 40
    for got, want in zip(mixed.logprobs, alone.logprobs):
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-4, atol=1e-5)


def test_32_mixed_requests_complete_and_greedy_equals_solo(engine, rng):
    requests = []
    for i in range(32):
        gen = greedy(int(rng.integers(1, 20)))
        if i % 2:
            gen = gen.replace(do_sample=True, temperature=float(rng.uniform(0.5, 1.5)), top_k=int(rng.integers(0, 40)),
                              top_p=float(rng.uniform(0.5, 1.0)), min_p=float(rng.choice([0.0, 0.05])),
                              repetition_penalty=float(rng.choice([1.0, 1.2])), logprobs=int(rng.integers(0, 4)))
        elif i % 4 == 0:
            gen = gen.replace(repetition_penalty=1.3, bad_token_ids=ids(rng, 5))
        requests.append(EngineRequest(100 + i, ids(rng, int(rng.integers(1, 90))), gen))
    together = run_all(engine, requests)
    for req, res in zip(requests, together):
        assert res.finish_reason == 'length' and len(res.tokens) == req.gen_config.max_new_tokens
        if req.gen_config.logprobs is not None:
            assert len(res.logprobs) == len(res.tokens)
            assert all(t in lp and len(lp) <= req.gen_config.logprobs + 1 for t, lp in zip(res.tokens, res.logprobs))
    for req, res in zip(requests, together):
        if req.gen_config.greedy:
            assert run_all(engine, [req])[0].tokens == res.tokens


def test_seeded_sampling_repeats(engine, rng):
    gen = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0,
                           random_seed=int(rng.integers(1 << 30)))
    prompt = ids(rng, 9)
    first, second = run_all(engine, [EngineRequest(1, prompt, gen), EngineRequest(2, prompt, gen)])
    assert first.tokens == second.tokens


def test_small_pool_preempts_and_still_gives_the_right_tokens(tiny, rng):
    config = TurbomindEngineConfig(session_len=SESSION, max_batch_size=8, cache_block_seq_len=16,
                                   num_cache_blocks=16, max_prefill_token_num=256)
    eng = JaxEngine(tiny[0], config, **BUCKETS)
    try:
        prompts = [ids(rng, int(rng.integers(20, 50))) for _ in range(8)]   # ~8 x 4 blocks > 15
        results = run_all(eng, [EngineRequest(i, p, greedy(40)) for i, p in enumerate(prompts)])
        assert eng.stats()['preemptions'] > 0
        for p, r in zip(prompts, results):
            assert r.tokens == hf_greedy(tiny[1], p, 40)
        assert eng.num_free_blocks() == eng.num_total_blocks()
    finally:
        eng.close()


def test_prefix_cache_reuses_blocks(engine, tiny, rng):
    prefix = ids(rng, 50)
    run_all(engine, [EngineRequest(1, prefix + ids(rng, 5), greedy(8))])
    hits, prefilled = engine.stats()['prefix_hit_blocks'], engine.stats()['prefilled_tokens']
    prompt = prefix + ids(rng, 7)
    second = run_all(engine, [EngineRequest(2, prompt, greedy(8))])[0]
    assert engine.stats()['prefix_hit_blocks'] - hits == 3          # 50 shared tokens: 3 blocks of 16
    assert engine.stats()['prefilled_tokens'] - prefilled == len(prompt) - 48
    assert second.tokens == hf_greedy(tiny[1], prompt, 8)


def test_no_compilation_after_warmup(engine, rng):
    compiles = []

    def listener(name, *args, **kwargs):
        if 'compile' in name:
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.jit(lambda x: x * 3)(np.ones(int(rng.integers(1, 10**6))))   # the listener does see compiles
        assert compiles
        compiles.clear()
        requests = [EngineRequest(1000 + i, ids(rng, int(rng.integers(1, SESSION - 10))),
                                  greedy(int(rng.integers(1, 9)),
                                         logprobs=int(rng.choice([0, 3])) if i % 3 == 0 else None))
                    for i in range(100)]
        mixed = engine.stats()['mixed_steps']
        results = run_all(engine, requests)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert all(r.finish_reason == 'length' for r in results)
    assert compiles == []
    assert engine.stats()['mixed_steps'] > mixed       # prompts admitted as rows finished rode with the others


def test_two_turn_session_prefills_only_the_new_tokens(engine, rng):
    turn1, turn2 = ids(rng, 21), ids(rng, 6)
    first = run_all(engine, [EngineRequest(77, turn1, greedy(10), sequence_end=False)])[0]
    prefilled = engine.stats()['prefilled_tokens']
    second = run_all(engine, [EngineRequest(77, turn2, greedy(10), sequence_start=False)])[0]
    assert engine.stats()['prefilled_tokens'] - prefilled == len(turn2) + 1   # last answer token + new prompt
    whole = run_all(engine, [EngineRequest(78, turn1 + first.tokens + turn2, greedy(10))])[0]
    assert second.tokens == whole.tokens


def test_get_ppl_matches_cross_entropy(engine, tiny, rng):
    seqs = [ids(rng, 2), ids(rng, 45), ids(rng, 120)]
    got = engine.get_ppl(seqs)
    for s, g in zip(seqs, got):
        with torch.no_grad():
            logits = tiny[1](torch.tensor([s])).logits[0, :-1]
        want = float(torch.nn.functional.cross_entropy(logits, torch.tensor(s[1:])))
        assert abs(g - want) < 1e-4
    with pytest.raises(ValueError):
        engine.get_ppl([[5]])


def test_token_states_equal_transformers(engine, tiny, rng):
    """``output_logits`` / ``output_last_hidden_state``'s pass: float32 logits and final-normed hidden
    states at every position, for a batch of sequences (one chunk shape: one compile per kind)."""
    seqs = [ids(rng, 1), ids(rng, 16), ids(rng, 9)]
    both = engine.token_states(seqs)
    hidden_only = engine.token_states(seqs[1:2], logits=False)
    for s, (logits, hidden) in zip(seqs, both):
        with torch.no_grad():
            out = tiny[1](torch.tensor([s]), output_hidden_states=True)
        assert logits.dtype == hidden.dtype == np.float32
        assert logits.shape == (len(s), VOCAB) and hidden.shape == (len(s), 64)
        np.testing.assert_allclose(logits, out.logits[0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(hidden, out.hidden_states[-1][0].numpy(), rtol=1e-4, atol=1e-5)
    assert hidden_only[0][0] is None
    np.testing.assert_array_equal(hidden_only[0][1], both[1][1])
    with pytest.raises(ValueError, match=r'token_states: input_ids\[0\]\[0\]'):
        engine.token_states([[VOCAB]])


def test_cancel_frees_blocks_and_bad_inputs_error(engine, rng):
    start = engine.num_free_blocks()
    res = Result()
    first = []

    def on_output(out):
        res(out)
        if not first:
            first.append(out)
            engine.cancel(55)

    engine.submit(EngineRequest(55, ids(rng, 30), greedy(100)), on_output)
    res.wait()
    assert res.finish_reason == 'abort' and len(res.tokens) < 100
    assert engine.num_free_blocks() == start and engine.num_running() == 0
    bad = run_all(engine, [EngineRequest(56, [], greedy(4)), EngineRequest(57, ids(rng, SESSION + 1), greedy(4)),
                           EngineRequest(58, [VOCAB + 3], greedy(4))])
    assert [b.finish_reason for b in bad] == ['error'] * 3
    assert 'session_len' in bad[1].error
    ok = run_all(engine, [EngineRequest(59, ids(rng, 5), greedy(3))])[0]
    assert ok.finish_reason == 'length' and len(ok.tokens) == 3
    zero = run_all(engine, [EngineRequest(60, ids(rng, 5), greedy(0))])[0]
    assert zero.finish_reason == 'length' and zero.tokens == []
