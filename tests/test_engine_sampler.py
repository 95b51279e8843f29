"""The on-device sampler against the reference backend's torch sampling semantics, on fresh random
logits: penalties, masks and logprobs exactly; the warp's masks token for token; the seeded draw
reproducible per (seed, step) and distributed as softmax of the warped logits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lmdeploy_jax.engine import sampler
from lmdeploy_jax.messages import GenerationConfig
from lmdeploy_jax.pytorch import sampling as ref

VOCAB = 96
HIST = 24


@jax.jit
def _sample(logits, history, valid, sp):
    return sampler.sample(logits, lambda: (history, valid), sp)


def run(logits, histories, rows):
    """Sample rows of (gen_config, seed, generated); ``histories`` are each row's session tokens."""
    b = len(rows)
    hist = np.zeros((b, HIST), np.int32)
    valid = np.zeros((b, HIST), bool)
    for i, h in enumerate(histories):
        hist[i, :len(h)], valid[i, :len(h)] = h, True
    sp = sampler.host_sampling_params(rows, b)
    return jax.device_get(_sample(jnp.asarray(logits), hist, valid, sp))


def random_configs(rng, n, **fixed):
    configs = []
    for _ in range(n):
        kw = dict(repetition_penalty=float(rng.choice([1.0, 1.3, 0.8])),
                  bad_token_ids=rng.choice(VOCAB, 3, replace=False).tolist(),
                  stop_token_ids=rng.choice(VOCAB, 2, replace=False).tolist(),
                  min_new_tokens=int(rng.integers(0, 3)), logprobs=int(rng.integers(0, 6)))
        kw.update(fixed)
        configs.append(GenerationConfig(**kw))
    return configs


def test_greedy_rows_match_the_reference(rng):
    b = 6
    logits = rng.normal(0, 3, (b, VOCAB)).astype(np.float32)
    configs = random_configs(rng, b)
    histories = [rng.integers(0, VOCAB, int(rng.integers(1, HIST))).tolist() for _ in range(b)]
    generated = rng.integers(0, 4, b).tolist()
    out = run(logits, histories, [(g, 0, n) for g, n in zip(configs, generated)])
    for i, (gen, hist, n) in enumerate(zip(configs, histories, generated)):
        token, lps = ref.next_token(torch.from_numpy(logits[i]), gen, hist, n, torch.Generator())
        assert out.token[i] == token
        got = sampler.logprob_dict(out, i, gen.logprobs)
        assert got.keys() == lps.keys()
        np.testing.assert_allclose([got[k] for k in lps], list(lps.values()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('temperature,top_k,top_p,min_p', [
    (0.7, 5, 1.0, 0.0), (1.3, 0, 0.6, 0.0), (1.0, 0, 1.0, 0.2), (0.9, 20, 0.8, 0.05), (1.0, 0, 0.0, 0.0)])
def test_warp_masks_match_the_reference(rng, temperature, top_k, top_p, min_p):
    logits = rng.normal(0, 2, (4, VOCAB)).astype(np.float32)
    logits[0, :10] = logits[0, 0]                  # ties must be kept or dropped together
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    sp = sampler.host_sampling_params([(gen, 0, 0)] * 4, 4)
    got = np.asarray(jax.jit(sampler._warp)(jnp.asarray(logits), sp))
    want = ref.warp(torch.from_numpy(logits), temperature, top_k, top_p, min_p).numpy()
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_draw_is_seeded_per_step_and_follows_the_distribution(rng):
    n = 2048
    logits = np.tile(rng.normal(0, 1, VOCAB).astype(np.float32), (n, 1))
    gen = GenerationConfig(do_sample=True, temperature=0.8, top_k=30, top_p=0.9)
    seed = int(rng.integers(0, 2**31))
    rows = [(gen, seed, step) for step in range(n)]
    first, again = run(logits, [[]] * n, rows), run(logits, [[]] * n, rows)
    np.testing.assert_array_equal(first.token, again.token)                 # same seed and step
    other = run(logits, [[]] * n, [(gen, seed + 1, step) for step in range(n)])
    assert np.mean(first.token != other.token) > 0.5                         # another seed differs
    probs = torch.softmax(ref.warp(torch.from_numpy(logits[:1]), 0.8, 30, 0.9, 0.0), -1)[0].numpy()
    assert np.all(probs[first.token] > 0)                                    # only allowed tokens
    counts = np.bincount(first.token, minlength=VOCAB) / n
    assert np.abs(counts - probs).sum() < 0.2                                # total variation (~0.08 expected)


def test_greedy_and_sampled_rows_share_a_batch(rng):
    logits = rng.normal(0, 3, (4, VOCAB)).astype(np.float32)
    greedy = GenerationConfig()
    hot = GenerationConfig(do_sample=True, temperature=1.0, top_k=0)
    out = run(logits, [[]] * 4, [(greedy, 1, 0), (hot, 2, 0), (greedy, 3, 0), (hot, 4, 0)])
    assert out.token[0] == logits[0].argmax() and out.token[2] == logits[2].argmax()


def test_too_many_ids_is_refused():
    gen = GenerationConfig(stop_token_ids=list(range(sampler.MAX_ID_LIST + 1)))
    assert 'stop_token_ids' in sampler.id_list_error(gen)
    assert sampler.id_list_error(GenerationConfig(bad_token_ids=[1, 2])) is None


def test_greedy_only_sampler_gives_the_general_samplers_greedy_tokens(rng):
    """The engine runs ``general=False`` when no row samples or wants logprobs: the same tokens
    (penalties and masks included), zeros for the logprob outputs."""
    b = 5
    logits = rng.normal(0, 3, (b, VOCAB)).astype(np.float32)
    configs = random_configs(rng, b, logprobs=None)
    hist = rng.integers(0, VOCAB, (b, HIST)).astype(np.int32)
    valid = rng.random((b, HIST)) < 0.7
    sp = sampler.host_sampling_params([(g, 0, 1) for g in configs], b)
    assert not sampler.needs_general(sp)
    fast = jax.jit(lambda x: sampler.sample(x, lambda: (hist, valid), sp, general=False))(logits)
    full = jax.jit(lambda x: sampler.sample(x, lambda: (hist, valid), sp, general=True))(logits)
    np.testing.assert_array_equal(fast.token, full.token)
    assert not np.any(fast.logprob) and not np.any(fast.top_ids)


def test_the_general_sampler_is_needed_for_sampling_or_logprobs():
    greedy, hot, lp = GenerationConfig(), GenerationConfig(do_sample=True), GenerationConfig(logprobs=2)
    assert not sampler.needs_general(sampler.host_sampling_params([(greedy, 0, 0)] * 2, 4))
    assert sampler.needs_general(sampler.host_sampling_params([(greedy, 0, 0), (hot, 0, 0)], 4))
    assert sampler.needs_general(sampler.host_sampling_params([(lp, 0, 0)], 4))


@pytest.mark.parametrize('general', [False, True])
def test_the_sampler_has_no_conditional(general):
    """A conditional in the compiled step makes XLA wait on the host for its predicate on every
    step (GPU), which stops the engine from queueing the next call behind a running one."""
    b = 3
    sp = sampler.host_sampling_params([(GenerationConfig(), 0, 0)], b)
    hist, valid = np.zeros((b, HIST), np.int32), np.ones((b, HIST), bool)
    hlo = jax.jit(lambda x: sampler.sample(x, lambda: (hist, valid), sp, general)).lower(
        jnp.ones((b, VOCAB), jnp.float32)).as_text()
    assert 'stablehlo.case' not in hlo and 'stablehlo.if' not in hlo
