"""The scheduler on the host alone, fed random 'sampled' tokens: chunked prefill under the budget,
preemption when the pool runs dry (every request still completes, every block comes back), session
semantics and refusals."""
from __future__ import annotations

import numpy as np
import pytest

from lmdeploy_jax.engine.block_manager import BlockManager
from lmdeploy_jax.engine.buckets import make_buckets
from lmdeploy_jax.engine.sampler import MAX_LOGPROBS, SampleOutput
from lmdeploy_jax.engine.scheduler import PREFILL_STREAK, Scheduler
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import GenerationConfig

VOCAB = 500
BS = 4


def make(num_blocks=64, session_len=64, max_batch=4, prefill=32, prefix=False, decode_steps=1, mixed=False):
    buckets = make_buckets(max_batch, prefill, session_len, BS)
    return Scheduler(BlockManager(num_blocks, BS, prefix), buckets, session_len, max_batch, VOCAB, decode_steps,
                     mixed=mixed)


def random_output(rng, plan, low=10):
    """A plan's 'sampled' tokens in [low, VOCAB): decode calls return [steps, B]; a mixed step's
    rows are its decode segment's, then its prefill rows."""
    b = plan.segment + plan.shape[0]
    k = () if plan.prefill else (plan.steps,)
    return SampleOutput(rng.integers(low, VOCAB, k + (b,)), np.zeros(k + (b,), np.float32),
                        np.zeros(k + (b, MAX_LOGPROBS), np.float32), np.zeros(k + (b, MAX_LOGPROBS), np.int32))


def check_plan(plan, budget):
    """Checked when planned (a chained plan's ``carry`` counts the call still in flight)."""
    b, t = plan.shape
    assert plan.decode_rows <= plan.segment and all(n == 1 and seq.pending == 1
                                                    for seq, n, _ in plan.rows[:plan.decode_rows])
    assert len(plan.rows) - plan.decode_rows <= b and all(0 < n <= t * plan.steps for _, n, _ in plan.rows)
    if plan.prefill:
        assert b * t <= budget or b == 1
    ahead = plan.carry.cached if plan.carry is not None else [0] * len(plan.rows)
    for (seq, n, _), k in zip(plan.rows, ahead):
        assert len(seq.blocks) * BS >= seq.num_cached + k + n


def check_slots(sched):
    """Every running sequence holds its own row slot; the others hold none; none is lost."""
    slots = [seq.slot for seq in sched.running]
    assert len(set(slots)) == len(slots) and all(0 <= s < sched.max_batch_size for s in slots)
    assert all(seq.slot is None for seq in sched.waiting)
    assert sorted(slots + sched._free_slots) == list(range(sched.max_batch_size))


def check_carry(plan, chained):
    """A chained prefill step feeds none of the rows in flight; a chained decode call's rows of
    the call in flight continue from it."""
    if chained.prefill:
        assert chained.carry is None and not {id(r[0]) for r in chained.rows} & {id(r[0]) for r in plan.rows}
        return
    carry = chained.carry
    assert len(carry.source) == len(chained.rows)
    for (seq, _, _), src, cached, sampled in zip(chained.rows, carry.source, carry.cached, carry.sampled):
        if src < 0:
            assert seq not in [r[0] for r in plan.rows] and (cached, sampled) == (0, 0) and seq.pending == 1
        else:
            prev_seq, fed, _ = plan.rows[src]
            assert prev_seq is seq and cached == fed
            assert sampled == (1 if plan.prefill else plan.steps)


def run_to_end(sched, rng, max_steps=2000, chain=False, low=10, budget=32):
    """Step until idle with random tokens (none below ``low``: 10 keeps clear of stop ids below
    it); checks each plan's invariants. With ``chain``, as the engine does: a call's chained
    successor is planned before the call's results are taken. Returns how many calls were chained,
    by (kind of the call in flight, kind of the chained one): (True, False) is a decode call behind
    a prefill step."""
    in_flight = None
    chained = {(a, b): 0 for a in (True, False) for b in (True, False)}
    for _ in range(max_steps):
        if in_flight is None:
            in_flight = sched.schedule()
            if in_flight is None:
                return chained
            check_plan(in_flight, budget)
        plan = in_flight
        in_flight = sched.chain(plan) if chain else None
        if in_flight is not None:
            chained[plan.prefill, in_flight.prefill] += 1
            check_carry(plan, in_flight)
            check_plan(in_flight, budget)
        sched.complete(plan, random_output(rng, plan, low))
        check_slots(sched)
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


@pytest.mark.parametrize('prefix', [False, True])
def test_chained_decode_calls_complete_everything_and_stops_drop_the_rest(rng, prefix):
    """Decode calls dispatched behind the one in flight: every request still gets exactly its
    tokens up to its finish (stop ids drawn often, so rows stop inside calls whose successor is
    already planned), every block comes back."""
    sched = make(num_blocks=80, decode_steps=4, prefix=prefix, session_len=128, max_batch=8, prefill=128)
    reqs = []
    for sid in range(6):
        c = Collector()
        prompt = rng.integers(0, VOCAB, int(rng.integers(5, 15))).tolist()
        stops = rng.choice(np.arange(10, VOCAB), 8, replace=False).tolist() if sid % 2 else []
        new = int(rng.integers(16, 40))      # all prefill in one step, then chain at once
        sched.submit(EngineRequest(sid, prompt, GenerationConfig(max_new_tokens=new, stop_token_ids=stops)), c)
        reqs.append((c, stops, new))
    chained = run_to_end(sched, rng, chain=True, budget=128)
    assert chained[True, False] > 0 and chained[False, False] > 0   # decode behind prefill and behind decode
    for c, stops, new in reqs:
        if c.final.finish_reason == 'length':
            assert len(c.tokens) == new
        else:
            assert c.final.finish_reason == 'stop' and len(c.tokens) < new
        assert not set(c.tokens) & set(stops)
    assert sched.blocks.num_free() == 79 and not sched.sessions


@pytest.mark.parametrize('prefix', [False, True])
def test_prompts_waiting_for_slots_are_prefilled_behind_running_calls(rng, prefix):
    """More requests than slots: as rows finish, the waiting prompts' prefill steps are chained
    behind the calls in flight, and decode calls behind those; every request gets exactly its
    tokens and every block and slot comes back."""
    sched = make(num_blocks=80, decode_steps=4, prefix=prefix, session_len=128, max_batch=4, prefill=64)
    reqs = [submit(sched, rng, sid, int(rng.integers(3, 30)), int(rng.integers(1, 30))) for sid in range(12)]
    chained = run_to_end(sched, rng, chain=True, budget=64)
    assert chained[False, True] > 0 and chained[True, False] > 0      # prefill behind decode, decode behind prefill
    for c, _ in reqs:
        assert c.final.finish_reason == 'length' and len(c.tokens) == c.new
    assert sched.blocks.num_free() == 79 and not sched.sessions and len(sched._free_slots) == 4


def test_chain_waits_for_prompts_lengths_and_blocks(rng):
    sched = make(num_blocks=64, decode_steps=4, session_len=64)
    submit(sched, rng, 1, 5, 12)                       # 1 + 4 + 4 + 4: the third call ends it
    plan = sched.schedule()
    sched.complete(plan, random_output(rng, plan))     # prefill
    plan = sched.schedule()
    assert not plan.prefill and sched.chain(plan) is not None
    submit(sched, rng, 2, 5, 12)
    chained = sched.chain(plan)                        # a prompt waits and a slot is free: its prefill
    assert chained.prefill and [r[0].session_id for r in chained.rows] == [2]
    full = make(num_blocks=64, decode_steps=4, session_len=64, max_batch=1)
    submit(full, rng, 1, 5, 12)
    plan = full.schedule()
    full.complete(plan, random_output(rng, plan))
    plan = full.schedule()
    submit(full, rng, 2, 5, 12)
    assert full.waiting and full.chain(plan) is not None   # no slot before a row finishes: chain on
    sched = make(num_blocks=64, decode_steps=4, session_len=64)
    submit(sched, rng, 1, 5, 8)                        # 1 + 4 + 3: the chained call feeds its last 3
    submit(sched, rng, 2, 5, 5)                        # 1 + 4: it ends inside the call in flight
    plan = sched.schedule()
    while plan.prefill:
        sched.complete(plan, random_output(rng, plan))
        plan = sched.schedule()
    chained = sched.chain(plan)
    assert [(seq.session_id, n) for seq, n, _ in chained.rows] == [(1, 3)] and chained.carry.source == [0]
    sched = make(num_blocks=3, decode_steps=4, session_len=64)   # 2 blocks of 4: no room 8 ahead
    submit(sched, rng, 1, 2, 20)
    plan = sched.schedule()
    sched.complete(plan, random_output(rng, plan))
    assert sched.chain(sched.schedule()) is None


def test_a_decode_call_chains_behind_the_prefill_of_a_new_prompt(rng):
    """A decoding row and a row whose prompt the prefill in flight completes share the chained
    call: the first is fed by the host, the second by the prefill's sampled token, one position
    past its prompt; both get exactly their tokens, in order."""
    sched = make(num_blocks=64, decode_steps=4, session_len=64)
    a, _ = submit(sched, rng, 1, 5, 12)
    plan = sched.schedule()
    sched.complete(plan, random_output(rng, plan))            # a's prefill: a decodes next
    b, b_ids = submit(sched, rng, 2, 7, 12)
    prefill = sched.schedule()
    assert prefill.prefill and [r[0].session_id for r in prefill.rows] == [2]
    chained = sched.chain(prefill)
    assert [r[0].session_id for r in chained.rows] == [1, 2]
    assert (chained.carry.source, chained.carry.cached, chained.carry.sampled) == ([-1, 0], [0, 7], [0, 1])
    first = random_output(rng, prefill)
    sched.complete(prefill, first)
    assert b.tokens == [int(first.token[0])]
    out = random_output(rng, chained)
    sched.complete(chained, out)
    assert a.tokens[-4:] == out.token[:, 0].tolist() and b.tokens[1:] == out.token[:, 1].tolist()
    assert sched.sessions[2].num_cached == len(b_ids) + 4


def test_mixed_steps_carry_the_decoding_rows_beside_the_prompts(rng):
    """With mixed steps on, prompts arriving while others decode are prefilled in a step that also
    feeds each decoding row its one token (decode rows first, their results at the front of the
    step's outputs, the prompts' after the whole decode segment), and the prompt left outside it
    is not chained as a prefill step that the decoding rows would wait behind; with mixed steps
    off, the same state plans a plain prefill step and chains the last prompt's behind it."""
    for mixed in (False, True):
        sched = make(num_blocks=64, decode_steps=4, session_len=64, max_batch=8, prefill=128, mixed=mixed)
        a, _ = submit(sched, rng, 1, 5, 12)
        b, _ = submit(sched, rng, 2, 3, 12)
        plan = sched.schedule()
        assert plan.shape == (4, 32)
        sched.complete(plan, random_output(rng, plan))         # both prefilled: both decode next
        prompts = [submit(sched, rng, 3 + i, n, 4) for i, n in enumerate((30, 9, 12, 7, 5))]
        plan = sched.schedule()
        assert plan.prefill and plan.shape == (4, 32)
        assert [(r[0].session_id, r[1]) for r in plan.rows][-4:] == [(3, 30), (4, 9), (5, 12), (6, 7)]
        chained = sched.chain(plan)
        if not mixed:
            assert plan.decode_rows == plan.segment == 0 and len(plan.rows) == 4
            assert chained.prefill and [r[0].session_id for r in chained.rows] == [7]
            continue
        assert chained is None                              # the decoding rows wait for the next mixed step
        assert [(r[0].session_id, r[1]) for r in plan.rows[:2]] == [(1, 1), (2, 1)]
        assert (plan.decode_rows, plan.segment) == (2, 8)
        out = random_output(rng, plan)
        prefilled = sched.prefilled_tokens
        sched.complete(plan, out)
        assert a.tokens[-1] == out.token[0] and b.tokens[-1] == out.token[1] and len(a.tokens) == 2
        assert [c.tokens for c, _ in prompts[:4]] == [[out.token[8 + i]] for i in range(4)]
        assert sched.prefilled_tokens - prefilled == 58 and sched.mixed_steps == 1
        assert sched.sessions[1].num_cached == 5 + 1 and sched.sessions[3].num_cached == 30
        plan = sched.schedule()                             # the last prompt, with all six decoding rows
        assert (plan.decode_rows, [r[0].session_id for r in plan.rows[6:]]) == (6, [7])
        sched.complete(plan, random_output(rng, plan))
        chained = sched.chain(sched.schedule())             # all decode now: calls chain again
        assert chained is not None and not chained.prefill


@pytest.mark.parametrize('prefix', [False, True])
def test_mixed_steps_with_chaining_and_preemption_complete_everything(rng, prefix):
    """Staggered requests on a small pool with mixed steps on: every request gets exactly its
    tokens (the stops drawn often), every block and slot comes back, and mixed steps ran."""
    for _ in range(4):     # about one draw in a hundred preempts nothing: draw again
        sched = make(num_blocks=30, decode_steps=4, prefix=prefix, session_len=128, max_batch=4, prefill=64,
                     mixed=True)
        reqs = []
        for sid in range(12):
            c = Collector()
            stops = rng.choice(np.arange(10, VOCAB), 8, replace=False).tolist() if sid % 3 == 0 else []
            new = int(rng.integers(1, 30))
            prompt = rng.integers(0, VOCAB, int(rng.integers(3, 60))).tolist()
            sched.submit(EngineRequest(sid, prompt, GenerationConfig(max_new_tokens=new, stop_token_ids=stops)), c)
            reqs.append((c, stops, new))
        run_to_end(sched, rng, chain=True, budget=64)
        if sched.num_preemptions:
            break
    assert sched.mixed_steps > 0 and sched.num_preemptions > 0
    for c, stops, new in reqs:
        assert len(c.tokens) == new if c.final.finish_reason == 'length' else c.final.finish_reason == 'stop'
        assert not set(c.tokens) & set(stops)
    assert sched.blocks.num_free() == 29 and not sched.sessions and len(sched._free_slots) == 4


def test_riders_that_preempt_every_prompt_still_decode():
    """Seed 6 once had a mixed step's decode riders take the blocks of every prompt: the lone rider
    left was then failed as too long for the pool, though it fit."""
    test_mixed_steps_with_chaining_and_preemption_complete_everything(np.random.default_rng(6), False)


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


def test_mixed_steps_leave_guided_rows_out_but_never_starve_them():
    """With mixed steps on, a guided row (its mask needs each token first) rides no mixed step:
    it decodes in decode calls, one at least every ``PREFILL_STREAK + 1`` steps while a stream of
    prompts is prefilled, and the unguided decoding row rides every prefill step."""
    from transformers import AutoTokenizer

    from lmdeploy_jax.checkpoint.source import resolve_model
    from lmdeploy_jax.guided import GrammarCache, Guide
    source = resolve_model(None)
    letter = AutoTokenizer.from_pretrained(source.hf_dir).encode('a')
    assert len(letter) == 1
    vocab = source.config_dict()['vocab_size']
    buckets = make_buckets(4, 32, 128, BS)
    guide = Guide(GrammarCache(source.hf_dir, vocab))
    sched = Scheduler(BlockManager(200, BS, False), buckets, 128, 4, vocab, 4, guide, mixed=True)
    guided, free = Collector(), Collector()
    fmt = {'type': 'regex_schema', 'regex_schema': 'a{40}'}
    sched.submit(EngineRequest(1, [5, 6, 7], GenerationConfig(max_new_tokens=40, response_format=fmt)), guided)
    sched.submit(EngineRequest(2, [8, 9], GenerationConfig(max_new_tokens=100)), free)
    kinds, sid = [], 3
    while guided.final is None:
        if len(sched.running) < 4:                          # a long prompt (three chunks) whenever a slot frees
            sched.submit(EngineRequest(sid, list(range(10, 100)), GenerationConfig(max_new_tokens=1)), Collector())
            sid += 1
        plan = sched.schedule()
        sessions = [seq.session_id for seq, _, _ in plan.rows]
        if plan.prefill and any(s > 2 for s in sessions[plan.decode_rows:]) and free.final is None:
            assert 2 in sessions[:plan.decode_rows] and 1 not in sessions
        kinds.append('guided' if 1 in sessions and not plan.prefill else 'mixed' if plan.decode_rows else 'other')
        out = random_output(np.random.default_rng(0), plan)
        out.token[...] = letter[0]
        sched.complete(plan, out)
    assert guided.final.finish_reason == 'length' and len(guided.tokens) == 40
    assert kinds.count('mixed') > 10 and kinds.count('guided') >= 40
    runs = ''.join('g' if k == 'guided' else 'x' for k in kinds).split('g')
    assert max(len(run) for run in runs[1:-1]) <= PREFILL_STREAK
