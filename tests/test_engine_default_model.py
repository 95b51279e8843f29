"""The JAX engine on the real default model (SmolLM2-135M-Instruct, float32, CPU): greedy tokens equal
transformers' ``generate`` token for token, 8 varied chat prompts x 64 new tokens, and get_ppl."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_engine_helpers import run_all, small_default_engine
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import GenerationConfig

EOS = 2
NEW = 64
QUESTIONS = ['What is the capital of France?', 'Write a haiku about the sea.',
             'Explain in detail, step by step, how a bicycle gear system works, what the chain does, '
             'and why riders shift gears when they climb hills or ride fast on flat roads.',
             'List three prime numbers.', 'Who wrote Hamlet?', 'Translate "good morning" into Spanish.',
             'Why is the sky blue?', 'Give me a short recipe for pancakes with milk, eggs and flour.']


@pytest.fixture(scope='module')
def source():
    return resolve_model(None)


@pytest.fixture(scope='module')
def prompts(source):
    tok = AutoTokenizer.from_pretrained(source.hf_dir)
    return [tok.apply_chat_template([{'role': 'user', 'content': q}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)['input_ids'] for q in QUESTIONS]


@pytest.fixture(scope='module')
def engine(source):
    eng = small_default_engine(source)
    yield eng
    eng.close()


@pytest.fixture(scope='module')
def hf(source):
    return AutoModelForCausalLM.from_pretrained(source.hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope='module')
def greedy_results(engine, prompts):
    gen = GenerationConfig(max_new_tokens=NEW, min_new_tokens=NEW, stop_token_ids=[EOS])
    results = run_all(engine, [EngineRequest(i, p, gen) for i, p in enumerate(prompts)])
    assert all(r.finish_reason == 'length' and len(r.tokens) == NEW for r in results)
    return results


def test_greedy_is_transformers_argmax_at_every_position(hf, prompts, greedy_results):
    """All 8 prompts: one transformers forward over prompt + our answer; each of our tokens must be
    its argmax (EOS masked, as ``min_new_tokens`` does), which is what greedy ``generate`` picks."""
    assert max(map(len, prompts)) > 64                       # one prompt takes two prefill chunks
    for prompt, res in zip(prompts, greedy_results):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + res.tokens])).logits[0, len(prompt) - 1:-1]
        logits[:, EOS] = -torch.inf
        assert res.tokens == logits.argmax(-1).tolist()


# transformers' generate is slow on 2 shared CPU cores (~10-40 s per prompt): the longest prompt
# (two prefill chunks) by default, all eight with LMDEPLOY_JAX_SLOW_TESTS=1
GENERATE_PROMPTS = range(len(QUESTIONS)) if os.environ.get('LMDEPLOY_JAX_SLOW_TESTS') else (2,)


@pytest.mark.parametrize('index', GENERATE_PROMPTS)
def test_greedy_equals_transformers_generate(hf, prompts, greedy_results, index):
    prompt = prompts[index]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                           eos_token_id=EOS, pad_token_id=EOS)[0, len(prompt):].tolist()
    assert greedy_results[index].tokens == want


def test_get_ppl_matches_cross_entropy(engine, hf, prompts):
    rng = np.random.default_rng()
    seqs = [prompts[2], rng.integers(3, 49152, 90).tolist()]
    for seq, got in zip(seqs, engine.get_ppl(seqs)):
        with torch.no_grad():
            logits = hf(torch.tensor([seq])).logits[0, :-1]
        assert abs(got - float(torch.nn.functional.cross_entropy(logits, torch.tensor(seq[1:])))) < 1e-4
