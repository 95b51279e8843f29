"""The scheduler on the host alone, fed random 'sampled' tokens: chunked prefill under the budget,
preemption when the pool runs dry (every request still completes, every block comes back), session
semantics and refusals."""
from __future__ import annotations

import numpy as np
import pytest

from lmdeploy_jax.engine.block_manager import BlockManager
from lmdeploy_jax.engine.buckets import make_buckets
from lmdeploy_jax.engine.sampler import MAX_LOGPROBS, SampleOutput
from lmdeploy_jax.engine.scheduler import Scheduler
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import GenerationConfig

VOCAB = 500
BS = 4


def make(num_blocks=64, session_len=64, max_batch=4, prefill=32, prefix=False, decode_steps=1):
    buckets = make_buckets(max_batch, prefill, session_len, BS)
    return Scheduler(BlockManager(num_blocks, BS, prefix), buckets, session_len, max_batch, VOCAB, decode_steps)


def run_to_end(sched, rng, max_steps=2000):
    """Step until idle with random tokens (never a stop id below 10); checks each plan's invariants."""
    for _ in range(max_steps):
        plan = sched.schedule()
        if plan is None:
            return
        b, t = plan.shape
        assert len(plan.rows) <= b and all(0 < n <= t * plan.steps for _, n, _ in plan.rows)
        if plan.prefill:
            assert b * t <= 32 or b == 1
        for seq, n, _ in plan.rows:
            assert len(seq.blocks) * BS >= seq.num_cached + n
        k = () if plan.prefill else (plan.steps,)        # decode calls return [steps, B]
        out = SampleOutput(rng.integers(10, VOCAB, k + (b,)), np.zeros(k + (b,), np.float32),
                           np.zeros(k + (b, MAX_LOGPROBS), np.float32), np.zeros(k + (b, MAX_LOGPROBS), np.int32))
        sched.complete(plan, out)
    raise AssertionError('the scheduler did not finish')


class Collector:
    def __init__(self):
        self.tokens, self.final = [], None

    def __call__(self, out):
        self.tokens += out.token_ids
        if out.finish_reason:
            self.final = out


def submit(sched, rng, sid, prompt_len, new, **kw):
    c = Collector()
    c.new = new
    ids = rng.integers(0, VOCAB, prompt_len).tolist()
    sched.submit(EngineRequest(sid, ids, GenerationConfig(max_new_tokens=new), **kw), c)
    return c, ids


def test_chunked_prefill_and_preemption_complete_everything(rng):
    sched = make(num_blocks=24)                         # 23 blocks = 92 tokens for 6 x ~50
    reqs = [submit(sched, rng, sid, int(rng.integers(5, 40)), 20) for sid in range(6)]
    run_to_end(sched, rng)
    assert sched.num_preemptions > 0
    for c, ids in reqs:
        assert c.final.finish_reason == 'length' and len(c.tokens) == 20
    assert sched.blocks.num_free() == 23 and not sched.sessions
    assert sched.prefilled_tokens >= sum(len(ids) for _, ids in reqs)


@pytest.mark.parametrize('prefix', [False, True])
def test_several_steps_a_call_reserve_blocks_and_cut_at_the_finish(rng, prefix):
    sched = make(num_blocks=20, decode_steps=4, prefix=prefix)  # 19 blocks = 76 tokens; 4 run, each growing to ~40
    reqs = [submit(sched, rng, sid, int(rng.integers(10, 15)), int(rng.integers(20, 31))) for sid in range(6)]
    run_to_end(sched, rng)                              # checks every row's blocks cover its steps
    assert sched.num_preemptions > 0
    for c, ids in reqs:
        assert c.final.finish_reason == 'length' and len(c.tokens) == c.new
    assert sched.blocks.num_free() == 19 and not sched.sessions


def test_session_keeps_kv_between_turns_and_end_frees_it(rng):
    sched = make()
    c1, ids1 = submit(sched, rng, 7, 10, 5, sequence_end=False)
    run_to_end(sched, rng)
    seq = sched.sessions[7]
    assert seq.tokens == ids1 + c1.tokens and seq.num_cached == len(seq.tokens) - 1
    before = sched.prefilled_tokens
    c2, ids2 = submit(sched, rng, 7, 6, 3, sequence_start=False, sequence_end=False)
    run_to_end(sched, rng)
    assert sched.prefilled_tokens - before == len(ids2) + 1   # the last answer token and the new prompt
    assert seq.tokens == ids1 + c1.tokens + ids2 + c2.tokens
    sched.end_session(7)
    assert sched.blocks.num_free() == 63 and 7 not in sched.sessions


def test_a_waiting_sequence_does_not_pin_prefix_blocks():
    """Seeds 13 and 39 once left a preempted sequence holding its re-matched cached blocks while it
    waited: the lone runner could never grow, preempted itself, and schedule() then failed."""
    for seed in (13, 39):
        test_several_steps_a_call_reserve_blocks_and_cut_at_the_finish(np.random.default_rng(seed), True)


def test_refusals_and_immediate_finishes(rng):
    sched = make(session_len=32)
    bad = [EngineRequest(1, [], GenerationConfig()), EngineRequest(2, [VOCAB], GenerationConfig()),
           EngineRequest(3, list(range(33)), GenerationConfig())]
    for req in bad:
        c = Collector()
        sched.submit(req, c)
        assert c.final.finish_reason == 'error' and c.final.error
    assert 'session_len=32' in c.final.error
    c, _ = submit(sched, rng, 4, 8, 0)
    assert c.final.finish_reason == 'length' and c.tokens == []
    busy, _ = submit(sched, rng, 5, 8, 4)
    again, _ = submit(sched, rng, 5, 8, 4)
    assert again.final.finish_reason == 'error' and 'busy' in again.final.error
    sched.cancel(5)
    assert busy.final.finish_reason == 'abort' and sched.blocks.num_free() == 63


def test_stop_token_ends_without_being_reported(rng):
    sched = make()
    c = Collector()
    sched.submit(EngineRequest(1, rng.integers(0, VOCAB, 5).tolist(),
                               GenerationConfig(max_new_tokens=50, stop_token_ids=[3])), c)
    plan = sched.schedule()
    b = plan.shape[0]
    sched.complete(plan, SampleOutput(np.full(b, 3), np.zeros(b, np.float32),
                                      np.zeros((b, MAX_LOGPROBS), np.float32),
                                      np.zeros((b, MAX_LOGPROBS), np.int32)))
    assert c.final.finish_reason == 'stop' and c.tokens == []


def test_prefix_cache_reuses_full_blocks(rng):
    sched = make(prefix=True)
    shared = rng.integers(0, VOCAB, 17).tolist()
    for sid in (1, 2):
        sched.submit(EngineRequest(sid, shared + rng.integers(0, VOCAB, 3).tolist(),
                                   GenerationConfig(max_new_tokens=2)), Collector())
        run_to_end(sched, rng)
    assert sched.blocks.prefix_hit_blocks == 4      # 17 shared tokens: 4 full blocks


def test_losing_the_device_cache_recomputes_everything(rng):
    sched = make(prefix=True)
    submit(sched, rng, 1, 13, 3, sequence_end=False)           # an idle session holding KV
    run_to_end(sched, rng)
    live = [submit(sched, rng, sid, 20, 6) for sid in (2, 3)]
    sched.complete(sched.schedule(), SampleOutput(rng.integers(10, VOCAB, 4), np.zeros(4, np.float32),
                                                  np.zeros((4, MAX_LOGPROBS), np.float32),
                                                  np.zeros((4, MAX_LOGPROBS), np.int32)))
    sched.forget_all_kv()
    assert sched.blocks.num_free() == 63 and sched.blocks.num_cached() == 0
    assert all(s.num_cached == 0 for s in sched.sessions.values()) and len(sched.waiting) == 2
    run_to_end(sched, rng)
    assert all(c.final.finish_reason == 'length' and len(c.tokens) == 6 for c, _ in live)
