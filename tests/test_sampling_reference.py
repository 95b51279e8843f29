"""The reference sampling functions against plain numpy reimplementations, on fresh random logits."""
import numpy as np
import pytest
import torch

from lmdeploy_jax.messages import GenerationConfig
from lmdeploy_jax.pytorch import sampling

VOCAB = 512
BATCH = 4


@pytest.fixture
def logits(rng):
    return rng.normal(0.0, 3.0, size=(BATCH, VOCAB)).astype(np.float32)


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kept(t):
    return torch.isfinite(t).numpy()


def test_repetition_penalty(rng, logits):
    ids = rng.integers(0, VOCAB, size=60).tolist()  # with repeats: each counts once
    for penalty in (1.3, 0.7):
        want = logits.copy()
        for i in set(ids):
            want[:, i] = np.where(want[:, i] > 0, want[:, i] / penalty, want[:, i] * penalty)
        got = sampling.apply_repetition_penalty(torch.from_numpy(logits), sampling.token_mask(ids, VOCAB), penalty)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    same = sampling.apply_repetition_penalty(torch.from_numpy(logits), sampling.token_mask(ids, VOCAB), 1.0)
    np.testing.assert_array_equal(same.numpy(), logits)


def test_mask_tokens(rng, logits):
    ids = rng.choice(VOCAB, size=7, replace=False)
    got = sampling.mask_tokens(torch.from_numpy(logits), ids.tolist()).numpy()
    assert np.all(got[:, ids] == -np.inf)
    rest = np.setdiff1d(np.arange(VOCAB), ids)
    np.testing.assert_array_equal(got[:, rest], logits[:, rest])


@pytest.mark.parametrize('k', [1, 5, 50, VOCAB - 1])
def test_top_k(logits, k):
    # token i survives when fewer than k tokens are strictly larger
    n_larger = (logits[:, None, :] > logits[:, :, None]).sum(axis=-1)
    got = sampling.top_k_mask(torch.from_numpy(logits), k)
    np.testing.assert_array_equal(kept(got), n_larger < k)
    np.testing.assert_array_equal(got.numpy()[kept(got)], logits[n_larger < k])
    assert kept(sampling.top_k_mask(torch.from_numpy(logits), 0)).all()


@pytest.mark.parametrize('p', [0.0, 0.3, 0.9, 0.999])
def test_top_p(logits, p):
    """A token is kept when the mass ranked above it is below p. Where that mass is within float32
    rounding of p (summation order decides), either answer is right: those tokens are not compared."""
    want = np.zeros_like(logits, dtype=bool)
    decided = np.ones_like(logits, dtype=bool)
    for row, probs in enumerate(np_softmax(logits.astype(np.float64))):
        order = np.argsort(-probs)
        before = np.cumsum(probs[order]) - probs[order]
        want[row, order] = (before < p) | (np.arange(len(order)) == 0)
        decided[row, order] = np.abs(before - p) > 1e-5
    got = kept(sampling.top_p_mask(torch.from_numpy(logits), p))
    np.testing.assert_array_equal(got[decided], want[decided])
    assert kept(sampling.top_p_mask(torch.from_numpy(logits), 1.0)).all()


@pytest.mark.parametrize('min_p', [0.01, 0.2, 1.0])
def test_min_p(logits, min_p):
    probs = np_softmax(logits)
    want = probs >= min_p * probs.max(axis=-1, keepdims=True)
    np.testing.assert_array_equal(kept(sampling.min_p_mask(torch.from_numpy(logits), min_p)), want)


def test_warp_applies_temperature_then_masks_in_order(logits):
    t, k, p, min_p = 0.7, 40, 0.8, 0.05
    x = logits / np.float32(t)
    keep = (x[:, None, :] > x[:, :, None]).sum(axis=-1) < k
    x = np.where(keep, x, -np.inf)
    probs = np_softmax(x)
    for row in range(BATCH):  # the nucleus over the top-k survivors' renormalized probabilities
        order = np.argsort(-probs[row])
        before = np.cumsum(probs[row][order]) - probs[row][order]
        x[row, order[(before >= p) & (np.arange(VOCAB) > 0)]] = -np.inf
    probs = np_softmax(x)
    x = np.where(probs >= min_p * probs.max(axis=-1, keepdims=True), x, -np.inf)
    got = sampling.warp(torch.from_numpy(logits), t, k, p, min_p).numpy()
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(x))
    np.testing.assert_allclose(got[np.isfinite(got)], x[np.isfinite(x)], rtol=1e-6)


def test_greedy_takes_lowest_id_on_ties(rng, logits):
    np.testing.assert_array_equal(sampling.greedy_token(torch.from_numpy(logits)).numpy(), logits.argmax(-1))
    tied = logits[0].copy()
    a, b = sorted(rng.choice(VOCAB, size=2, replace=False))
    tied[[a, b]] = tied.max() + 1.0
    assert int(sampling.greedy_token(torch.from_numpy(tied))) == a


def test_top_logprobs(logits):
    lp = torch.log_softmax(torch.from_numpy(logits[0]), dim=-1)
    want = np_log_softmax(logits[0])
    top = np.argsort(-want)[:5]
    sampled = int(np.argsort(-want)[100])
    got = sampling.top_logprobs(lp, sampled, 5)
    assert set(got) == {sampled, *top.tolist()}
    for i, v in got.items():
        assert v == pytest.approx(want[i], abs=1e-5)
    assert sampling.top_logprobs(lp, sampled, 0).keys() == {sampled}


def test_draw_repeats_with_seed_and_follows_the_distribution(rng):
    small = torch.from_numpy(rng.normal(0.0, 1.0, size=(8,)).astype(np.float32))
    small[3] = -np.inf
    draws = sampling.draw(small.expand(20000, 8), torch.Generator().manual_seed(7)).numpy()
    again = sampling.draw(small.expand(20000, 8), torch.Generator().manual_seed(7)).numpy()
    np.testing.assert_array_equal(draws, again)
    assert not np.any(draws == 3)
    freq = np.bincount(draws, minlength=8) / draws.size
    np.testing.assert_allclose(freq, np_softmax(small.numpy()), atol=0.015)
    other = sampling.draw(small.expand(20000, 8), torch.Generator().manual_seed(8)).numpy()
    assert not np.array_equal(draws, other)


def test_next_token_masks_stop_ids_until_min_new_tokens(rng):
    logits = torch.from_numpy(rng.normal(0.0, 1.0, size=(VOCAB,)).astype(np.float32))
    logits[2] = 50.0   # the stop id is by far the most likely
    gen = GenerationConfig(stop_token_ids=[2], min_new_tokens=3, do_sample=True, temperature=1.0, top_k=0)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        assert sampling.next_token(logits, gen, [], step, g)[0] != 2
    assert sampling.next_token(logits, gen, [], 3, g)[0] == 2
    assert sampling.next_token(logits, gen.replace(do_sample=False), [], 3, g)[0] == 2


def test_next_token_logprobs_follow_penalty_and_masks_not_temperature(rng):
    logits = torch.from_numpy(rng.normal(0.0, 3.0, size=(VOCAB,)).astype(np.float32))
    history = rng.integers(0, VOCAB, size=30).tolist()
    top = int(np.argmax(logits.numpy()))
    gen = GenerationConfig(do_sample=True, temperature=0.5, top_k=0, repetition_penalty=1.5,
                           bad_token_ids=[top], logprobs=3, random_seed=1)
    token, lps = sampling.next_token(logits, gen, history, 0, torch.Generator().manual_seed(1))
    want = logits.numpy().astype(np.float64)
    for i in set(history):
        want[i] = want[i] / 1.5 if want[i] > 0 else want[i] * 1.5
    want[top] = -np.inf
    want = np_log_softmax(want)
    assert token != top
    assert set(lps) == {token, *np.argsort(-want)[:3].tolist()}
    for i, v in lps.items():
        assert v == pytest.approx(want[i], abs=1e-5)
