"""Several decode steps per compiled call (``engine/multistep.py``): the same tokens and logprobs
as one step per call for greedy and seeded sampled requests (penalty, min_new_tokens, stop ids),
rows finishing inside a call, preemption, and the vectorized host arrays against the per-row ones."""
from __future__ import annotations

import time

import numpy as np
import pytest
from test_engine_helpers import TIMEOUT, Result, run_all
from test_engine_serving import BUCKETS, SESSION, VOCAB, hf_greedy, ids, tiny  # noqa: F401 - tiny is a fixture

from lmdeploy_jax.engine import JaxEngine
from lmdeploy_jax.engine.multistep import host_decode_batch
from lmdeploy_jax.engine.runner import host_step_batch
from lmdeploy_jax.engine.sequence import Sequence
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import GenerationConfig, TurbomindEngineConfig


def make_engine(tiny, steps, num_blocks=128):  # noqa: F811
    config = TurbomindEngineConfig(session_len=SESSION, max_batch_size=8, cache_block_seq_len=16,
                                   num_cache_blocks=num_blocks, max_prefill_token_num=256)
    return JaxEngine(tiny[0], config, decode_steps=steps, **BUCKETS)


@pytest.fixture(scope='module')
def engines(tiny):  # noqa: F811
    one, four = make_engine(tiny, 1), make_engine(tiny, 4)
    yield one, four
    one.close()
    four.close()


def mixed_requests(rng, n):
    requests = []
    for i in range(n):
        gen = GenerationConfig(max_new_tokens=int(rng.integers(1, 23)), logprobs=int(rng.integers(0, 4)))
        if i % 2:
            gen = gen.replace(do_sample=True, temperature=float(rng.uniform(0.5, 1.5)), top_k=int(rng.integers(0, 40)),
                              top_p=float(rng.uniform(0.6, 1.0)), repetition_penalty=float(rng.choice([1.0, 1.3])),
                              random_seed=int(rng.integers(1 << 30)))
        else:
            gen = gen.replace(repetition_penalty=float(rng.choice([1.0, 1.2])), min_new_tokens=int(rng.integers(0, 6)),
                              stop_token_ids=rng.choice(VOCAB, 64, replace=False).tolist())
        requests.append(EngineRequest(i, ids(rng, int(rng.integers(1, 60))), gen))
    return requests


def test_four_steps_a_call_give_the_tokens_of_one(engines, rng):
    requests = mixed_requests(rng, 12)
    one, four = (run_all(engine, requests) for engine in engines)
    assert any(r.finish_reason == 'stop' for r in one)             # some row stops (mid-call for K=4)
    for a, b in zip(one, four):
        assert (a.finish_reason, a.tokens) == (b.finish_reason, b.tokens)
        assert len(a.logprobs) == len(b.logprobs) == len(a.tokens)
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys() and np.allclose(list(x.values()), list(y.values()), atol=1e-5)
    # a call reports its tokens together: at most ceil(n / 4) + 1 outputs per request (the +1: prefill's)
    assert all(len(b.outputs) <= -(-len(b.tokens) // 4) + 1 for b in four)


def test_a_row_stopping_mid_call_does_not_disturb_the_others(engines, tiny, rng):  # noqa: F811
    _, four = engines
    prompts = [ids(rng, n) for n in (5, 20, 33)]
    want = [hf_greedy(tiny[1], p, 14) for p in prompts]
    stop = want[0][5]                                              # the 6th token: inside the second call
    first = want[0].index(stop)
    requests = [EngineRequest(0, prompts[0], GenerationConfig(max_new_tokens=14, stop_token_ids=[stop])),
                EngineRequest(1, prompts[1], GenerationConfig(max_new_tokens=6)),   # ends inside a call
                EngineRequest(2, prompts[2], GenerationConfig(max_new_tokens=14))]
    results = run_all(four, requests)
    assert (results[0].finish_reason, results[0].tokens) == ('stop', want[0][:first])
    assert (results[1].finish_reason, results[1].tokens) == ('length', want[1][:6])
    assert (results[2].finish_reason, results[2].tokens) == ('length', want[2])
    assert four.num_free_blocks() == four.num_total_blocks()


def test_preemption_with_four_steps_a_call(tiny, rng):  # noqa: F811
    engine = make_engine(tiny, 4, num_blocks=14)                   # 13 blocks of 16 for 8 x (20..50 + 30)
    try:
        prompts = [ids(rng, int(rng.integers(20, 50))) for _ in range(8)]
        results = run_all(engine, [EngineRequest(i, p, GenerationConfig(max_new_tokens=30))
                                   for i, p in enumerate(prompts)])
        assert engine.stats()['preemptions'] > 0
        for p, r in zip(prompts, results):
            assert r.tokens == hf_greedy(tiny[1], p, 30)
        assert engine.num_free_blocks() == engine.num_total_blocks()
    finally:
        engine.close()


def test_vectorized_decode_batch_equals_the_per_row_one(rng):
    block_size, max_blocks = 16, 12
    seqs = []
    for sid in range(int(rng.integers(1, 20))):
        seq = Sequence(sid, ids(rng, int(rng.integers(1, max_blocks * block_size))))
        seq.num_cached = len(seq.tokens) - 1
        seq.blocks = rng.choice(np.arange(1, 1000), -(-len(seq.tokens) // block_size) + int(rng.integers(0, 2)),
                                replace=False).tolist()[:max_blocks]
        seqs.append(seq)
    rows = 32
    got = host_decode_batch(seqs, rows, max_blocks, block_size)
    want = host_step_batch([(s.tokens[-1:], s.num_cached, s.blocks) for s in seqs], (rows, 1), max_blocks, block_size)
    for name in ('token_ids', 'positions', 'slot_mapping', 'block_tables', 'context_lens', 'query_lens'):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def test_a_failed_chained_launch_fails_its_requests_and_the_engine_goes_on(engines, tiny, rng, monkeypatch):  # noqa: F811
    """Chained calls are launched from the launcher thread; a failure there fails that call's
    requests on the engine thread, and the next requests run as usual."""
    _, four = engines
    runner, failures = four._runner, []
    real_launch = runner.launch

    def launch(call):
        if call.rows.from_device.any() and not failures:
            failures.append(call)
            raise RuntimeError('injected launch failure')
        return real_launch(call)
    monkeypatch.setattr(runner, 'launch', launch)
    prompts = [ids(rng, n) for n in (7, 12)]
    results = run_all(four, [EngineRequest(100 + i, p, GenerationConfig(max_new_tokens=12))
                             for i, p in enumerate(prompts)])
    assert failures and all(r.finish_reason == 'error' and 'injected' in r.error for r in results)
    prompt = ids(rng, 9)
    (again,) = run_all(four, [EngineRequest(200, prompt, GenerationConfig(max_new_tokens=12))])
    assert (again.finish_reason, again.tokens) == ('length', hf_greedy(tiny[1], prompt, 12))
    assert four.num_free_blocks() == four.num_total_blocks()


def test_a_prompt_joining_running_decodes_gets_its_tokens(engines, tiny, rng):  # noqa: F811
    """A prompt arriving while another request decodes: its prefill runs, and the decode call
    chained behind it feeds the new row from the prefill's token (on the device) and the running
    row from the host; both get the transformers tokens."""
    _, four = engines
    prompts = [ids(rng, 6), ids(rng, 11)]
    want = [hf_greedy(tiny[1], p, 40) for p in prompts]
    first, second = Result(), Result()
    four.submit(EngineRequest(300, prompts[0], GenerationConfig(max_new_tokens=40)), first)
    deadline = time.monotonic() + TIMEOUT
    while len(first.tokens) < 5 and time.monotonic() < deadline:
        time.sleep(0.001)
    chained_before = four.stats()['chained_calls']
    four.submit(EngineRequest(301, prompts[1], GenerationConfig(max_new_tokens=40)), second)
    assert first.wait().tokens == want[0] and second.wait().tokens == want[1]
    assert four.stats()['chained_calls'] > chained_before


def test_more_requests_than_slots_get_their_tokens(engines, tiny, rng, monkeypatch):  # noqa: F811
    """12 requests on 8 slots: the waiting prompts' prefill steps are chained behind running decode
    calls as rows finish, decode calls behind them; every request gets the transformers tokens."""
    _, four = engines
    scheduler, kinds = four._scheduler, []
    real_chain = scheduler.chain

    def chain(plan):
        chained = real_chain(plan)
        kinds.append((plan.prefill, chained.prefill if chained is not None else None))
        return chained
    monkeypatch.setattr(scheduler, 'chain', chain)
    prompts = [ids(rng, int(rng.integers(3, 40))) for _ in range(12)]
    lengths = [int(rng.integers(2, 25)) for _ in prompts]
    results = run_all(four, [EngineRequest(400 + i, p, GenerationConfig(max_new_tokens=n))
                             for i, (p, n) in enumerate(zip(prompts, lengths))])
    for p, n, r in zip(prompts, lengths, results):
        assert (r.finish_reason, r.tokens) == ('length', hf_greedy(tiny[1], p, n))
    assert four.num_free_blocks() == four.num_total_blocks()
    assert (False, True) in kinds and (True, False) in kinds     # prefill behind decode, decode behind prefill
