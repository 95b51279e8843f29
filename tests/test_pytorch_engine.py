"""The reference backend on the real default model (float32, CPU): tokens, sessions, finishing, errors."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.engine_api import EngineOutput, EngineRequest
from lmdeploy_jax.messages import GenerationConfig, PytorchEngineConfig
from lmdeploy_jax.pytorch.engine import PytorchEngine

EOS = 2
TIMEOUT = 300


@pytest.fixture(scope='module')
def source():
    return resolve_model(None)


@pytest.fixture(scope='module')
def engine(source):
    eng = PytorchEngine(source, PytorchEngineConfig(device_type='cpu'))
    yield eng
    eng.close()


@pytest.fixture(scope='module')
def chat_ids(source):
    """Chat prompts the model answers briefly and then stops with EOS."""
    tok = AutoTokenizer.from_pretrained(source.hf_dir)

    def encode(question):
        return tok.apply_chat_template([{'role': 'user', 'content': question}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)['input_ids']
    return encode


def random_ids(rng, n):
    return rng.integers(3, 49152, size=n).tolist()


@dataclass
class Result:
    outputs: list[EngineOutput] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def __call__(self, out: EngineOutput):
        self.outputs.append(out)
        if out.finish_reason is not None:
            self.done.set()

    def wait(self) -> 'Result':
        assert self.done.wait(TIMEOUT), 'the request did not finish'
        return self

    @property
    def tokens(self):
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def logprobs(self):
        return [lp for o in self.outputs for lp in (o.logprobs or [])]

    @property
    def finish(self):
        return self.outputs[-1].finish_reason


def submit(engine, session_id, ids, start=True, end=True, **gen) -> Result:
    res = Result()
    gen.setdefault('stop_token_ids', [EOS])
    engine.submit(EngineRequest(session_id, ids, GenerationConfig(**gen), start, end), res)
    return res


def run(engine, session_id, ids, **kw) -> Result:
    return submit(engine, session_id, ids, **kw).wait()


def test_greedy_matches_transformers_generate(engine, chat_ids, rng):
    for ids in (chat_ids('What is the capital of France?'), random_ids(rng, 20)):
        res = run(engine, 1, ids, max_new_tokens=10)
        with torch.inference_mode():
            ref = engine.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10,
                                        eos_token_id=EOS, pad_token_id=EOS)[0, len(ids):].tolist()
        if res.finish == 'stop':
            assert res.tokens + [EOS] == ref
        else:
            assert res.finish == 'length' and res.tokens == ref
        assert all(o.finish_reason is None for o in res.outputs[:-1])


def test_batch_of_16_equals_solo_runs(engine, rng):
    specs = []
    for i in range(16):
        gen = dict(max_new_tokens=int(rng.integers(2, 6)), logprobs=2 if i % 3 == 0 else None)
        if i % 2:
            gen.update(do_sample=True, temperature=1.0, top_k=0, top_p=0.95, random_seed=int(rng.integers(1 << 30)))
        specs.append((random_ids(rng, int(rng.integers(1, 48))), gen))
    seen_running = []
    together = []
    for i, (ids, gen) in enumerate(specs):
        res = Result()
        together.append(res)
        engine.submit(EngineRequest(100 + i, ids, GenerationConfig(**gen)),
                      lambda out, res=res: (seen_running.append(engine.num_running()), res(out)))
    for res in together:
        res.wait()
    assert max(seen_running) > 1, 'the requests never ran together'
    for (ids, gen), res in zip(specs, together):
        solo = run(engine, 7, ids, stop_token_ids=None, **gen)
        assert res.tokens == solo.tokens and res.finish == solo.finish == 'length'
        assert len(res.tokens) == gen['max_new_tokens']
        if gen['logprobs']:
            assert len(res.logprobs) == len(res.tokens)
            for a, b in zip(res.logprobs, solo.logprobs):
                assert a.keys() == b.keys() and np.allclose(list(a.values()), list(b.values()), atol=1e-5)
    assert engine.num_running() == 0 and engine.num_waiting() == 0


def test_seeded_sampling_repeats_and_seeds_differ(engine, rng):
    ids = random_ids(rng, 12)
    gen = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=0, stop_token_ids=None)
    a = run(engine, 1, ids, random_seed=1234, **gen).tokens
    assert run(engine, 1, ids, random_seed=1234, **gen).tokens == a
    assert run(engine, 1, ids, random_seed=4321, **gen).tokens != a
    assert run(engine, 1, ids, **gen).tokens != run(engine, 1, ids, **gen).tokens


def test_min_new_tokens_masks_stop_ids(engine, chat_ids):
    ids = chat_ids('What is the capital of France?')
    free = run(engine, 1, ids, max_new_tokens=30)
    assert free.finish == 'stop'
    n = len(free.tokens)
    held = run(engine, 1, ids, max_new_tokens=n + 3, min_new_tokens=n + 3)
    assert held.finish == 'length' and len(held.tokens) == n + 3
    assert held.tokens[:n] == free.tokens and EOS not in held.tokens


def test_max_new_tokens_gives_length(engine, rng):
    ids = random_ids(rng, 10)
    res = run(engine, 1, ids, max_new_tokens=3, stop_token_ids=None)
    assert res.finish == 'length' and len(res.tokens) == 3
    res = run(engine, 1, ids, max_new_tokens=0)
    assert res.finish == 'length' and res.tokens == [] and len(res.outputs) == 1


@pytest.fixture(scope='module')
def short_engine(source):
    """A session of 32 tokens, one request at a time."""
    eng = PytorchEngine(source, PytorchEngineConfig(device_type='cpu', session_len=32, max_batch_size=1))
    yield eng
    eng.close()


def test_session_len_gives_length_then_error(short_engine, rng):
    res = run(short_engine, 1, random_ids(rng, 28), max_new_tokens=100, stop_token_ids=None)
    assert res.finish == 'length' and len(res.tokens) == 4
    res = run(short_engine, 1, random_ids(rng, 32), max_new_tokens=100)
    assert res.finish == 'length' and res.tokens == []
    res = run(short_engine, 1, random_ids(rng, 33))
    assert res.finish == 'error' and 'session_len=32' in res.outputs[-1].error
    # a later turn counts the session's history
    first = run(short_engine, 2, random_ids(rng, 20), end=False, max_new_tokens=2, stop_token_ids=None)
    assert first.finish == 'length'
    res = run(short_engine, 2, random_ids(rng, 11), start=False)
    assert res.finish == 'error' and 'session_len=32' in res.outputs[-1].error


def test_queue_counts_and_max_batch_size(short_engine, rng):
    started = threading.Event()
    results = []
    for sid in range(3):
        res = Result()
        results.append(res)
        short_engine.submit(EngineRequest(10 + sid, random_ids(rng, 4), GenerationConfig(max_new_tokens=25)),
                            lambda out, res=res: (started.set(), res(out)))
    assert started.wait(TIMEOUT)
    assert short_engine.num_running() == 1 and short_engine.num_waiting() == 2
    assert short_engine.stats() == {'running': 1, 'waiting': 2}
    for sid in range(3):
        short_engine.cancel(10 + sid)
    assert [r.wait().finish for r in results] == ['abort'] * 3
    assert short_engine.num_running() == 0 and short_engine.num_waiting() == 0


def test_two_turns_equal_the_whole_history_at_once(engine, chat_ids, source):
    first_ids = chat_ids('What is the capital of France?')
    first = run(engine, 5, first_ids, end=False, max_new_tokens=30)
    assert first.finish == 'stop'
    tok = AutoTokenizer.from_pretrained(source.hf_dir)
    second_ids = tok('\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n')['input_ids']
    second = run(engine, 5, second_ids, start=False, max_new_tokens=8)
    whole = run(engine, 6, first_ids + first.tokens + [EOS] + second_ids, max_new_tokens=8)
    assert second.tokens == whole.tokens and second.finish == whole.finish
    # sequence_end forgot session 5: a continuation starts from nothing
    alone = run(engine, 6, second_ids, max_new_tokens=4, stop_token_ids=None)
    assert run(engine, 5, second_ids, start=False, max_new_tokens=4, stop_token_ids=None).tokens == alone.tokens


def test_cancel_aborts_and_the_session_keeps_what_was_generated(engine, rng):
    ids = random_ids(rng, 8)
    got_three = threading.Event()
    res = Result()

    def on_output(out):
        res(out)
        if len(res.tokens) >= 3:
            got_three.set()
    engine.submit(EngineRequest(9, ids, GenerationConfig(max_new_tokens=200), True, False), on_output)  # no stop ids
    assert got_three.wait(TIMEOUT)
    engine.cancel(9)
    assert res.wait().finish == 'abort' and 3 <= len(res.tokens) < 200
    follow = random_ids(rng, 3)
    cont = run(engine, 9, follow, start=False, max_new_tokens=3, stop_token_ids=None)
    whole = run(engine, 10, ids + res.tokens + follow, max_new_tokens=3, stop_token_ids=None)
    assert cont.tokens == whole.tokens
    engine.cancel(9)       # idle: a no-op
    engine.end_session(9)


def test_busy_session_and_end_session(engine, rng):
    ids = random_ids(rng, 6)
    busy = submit(engine, 11, ids, end=False, max_new_tokens=200, stop_token_ids=None)
    second = run(engine, 11, random_ids(rng, 4), start=False)
    assert second.finish == 'error' and 'busy' in second.outputs[-1].error
    engine.end_session(11)
    assert busy.wait().finish == 'abort'
    # the session was forgotten: a continuation equals a fresh start
    follow = random_ids(rng, 5)
    cont = run(engine, 11, follow, start=False, max_new_tokens=3, stop_token_ids=None)
    assert cont.tokens == run(engine, 12, follow, max_new_tokens=3, stop_token_ids=None).tokens


def test_get_ppl_equals_direct_cross_entropy(engine, rng):
    seqs = [random_ids(rng, 9), random_ids(rng, 25)]
    got = engine.get_ppl(seqs)
    for ids, ppl in zip(seqs, got):
        with torch.inference_mode():
            logits = engine.model(torch.tensor([ids])).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)
        want = -float(np.mean([lp[i - 1, ids[i]] for i in range(1, len(ids))]))
        assert ppl == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError):
        engine.get_ppl([[5]])


def test_bad_requests_error_and_the_engine_goes_on(engine, rng):
    assert run(engine, 1, []).finish == 'error'
    assert run(engine, 1, [5, 10 ** 6]).finish == 'error'
    malformed = Result()
    engine.submit(EngineRequest(1, [5, 6], None), malformed)
    assert malformed.wait().finish == 'error'
    # a failure inside the step (a bad id out of the vocabulary) finishes only that request
    failed = run(engine, 1, random_ids(rng, 5), bad_token_ids=[10 ** 6])
    assert failed.finish == 'error' and failed.outputs[-1].error
    ids = random_ids(rng, 5)
    ok = run(engine, 1, ids, max_new_tokens=2, stop_token_ids=None)
    assert ok.finish == 'length' and len(ok.tokens) == 2


def test_close_aborts_pending_and_running(source, rng):
    eng = PytorchEngine(source, PytorchEngineConfig(device_type='cpu', max_batch_size=1))
    started = threading.Event()
    results = [Result() for _ in range(3)]
    for sid, res in enumerate(results):
        eng.submit(EngineRequest(sid, random_ids(rng, 4), GenerationConfig(max_new_tokens=200)),
                   lambda out, res=res: (started.set(), res(out)))
    assert started.wait(TIMEOUT)
    eng.close()
    assert [r.wait().finish for r in results] == ['abort'] * 3
    late = Result()
    eng.submit(EngineRequest(5, [1, 2, 3], GenerationConfig()), late)
    assert late.wait().finish == 'abort'
    with pytest.raises(RuntimeError):
        eng.get_ppl([[1, 2, 3]])
