"""On-device sampling inside the compiled step, with per-row settings as small padded arrays.

The semantics are the reference backend's (``lmdeploy_jax/pytorch/sampling.py``), applied to every
row at once: repetition penalty over the session's tokens, bad ids and (before ``min_new_tokens``)
stop ids masked, logprobs of those logits, then argmax for greedy rows, or temperature, top-k,
top-p, min-p and a draw seeded by ``fold_in(key(seed), step)`` for the others. Masks compare
values, not sort positions, so ties are kept together exactly as the reference keeps them.

No ``lax.cond``: on a GPU, XLA evaluates a conditional's predicate on the host, so a call with one
would not return before the device ran up to it, and the engine could not queue the next call
behind it. The engine chooses on the host instead (``needs_general``): ``sample(..., general=False)``
is the greedy-only sampler (argmax, no vocabulary sort, no logprobs); the general one computes the
draw and the logprobs for every row. The repetition penalty is always applied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..messages import GenerationConfig

MAX_ID_LIST = 64      # most stop ids and most bad ids one request may give
MAX_LOGPROBS = 20     # GenerationConfig allows logprobs in [0, 20]


@jax.tree_util.register_dataclass
@dataclass
class SamplingParams:
    temperature: jax.Array         # float32 [B]   1 for greedy and padding rows
    top_k: jax.Array               # int32   [B]   0 disables
    top_p: jax.Array               # float32 [B]   1 disables
    min_p: jax.Array               # float32 [B]   0 disables
    repetition_penalty: jax.Array  # float32 [B]   1 disables
    greedy: jax.Array              # bool    [B]   argmax (padding rows too)
    seed: jax.Array                # uint32  [B]   the request's seed
    step: jax.Array                # int32   [B]   tokens the request generated so far (folded into the key)
    bad_ids: jax.Array             # int32   [B, MAX_ID_LIST]  masked always; -1 pads
    stop_ids: jax.Array            # int32   [B, MAX_ID_LIST]  masked while step < min_new; -1 pads
    min_new: jax.Array             # int32   [B]   min_new_tokens (compared on the device, so a
                                   #               multi-step call unmasks stop ids mid-way)
    want_logprobs: jax.Array       # bool    [B]   the row asked for logprobs


@jax.tree_util.register_dataclass
@dataclass
class SampleOutput:
    token: jax.Array               # int32   [B]   the sampled token of each row
    logprob: jax.Array             # float32 [B]   its log-probability (0 unless some row asked)
    top_logprobs: jax.Array        # float32 [B, MAX_LOGPROBS]  best log-probabilities, descending
    top_ids: jax.Array             # int32   [B, MAX_LOGPROBS]  their token ids


def id_list_error(gen: GenerationConfig) -> str | None:
    """Why a request's id lists do not fit the sampler's fixed width, or None."""
    for name in ('stop_token_ids', 'bad_token_ids'):
        ids = getattr(gen, name) or ()
        if len(ids) > MAX_ID_LIST:
            return f'at most {MAX_ID_LIST} {name} are supported, got {len(ids)}'
    return None


def host_sampling_params(rows: list[tuple[GenerationConfig, int, int]], num_rows: int) -> SamplingParams:
    """Numpy settings for ``num_rows`` rows from (gen_config, seed, generated so far) of the real ones.

    Every row's config has passed ``GenerationConfig.validate(vocab_size)`` (the scheduler refuses
    any other request alone when it arrives), which keeps each packed value inside its array's
    dtype and each id inside the vocabulary: packing a step's rows cannot fail on one of them.
    Built column by column from Python lists (one ``np.array`` per field), not element by element:
    at batch 256 the per-element writes cost milliseconds of host time per step."""
    n = len(rows)
    gens = [gen for gen, _, _ in rows]
    sampled = [not gen.greedy for gen in gens]

    def column(values, fill, dtype):
        out = np.full(num_rows, fill, dtype)
        out[:n] = values
        return out

    def id_lists(name):
        out = np.full((num_rows, MAX_ID_LIST), -1, np.int32)
        for i, gen in enumerate(gens):
            ids = getattr(gen, name)
            if ids:
                out[i, :len(ids)] = ids
        return out

    return SamplingParams(
        temperature=column([g.temperature if s else 1.0 for g, s in zip(gens, sampled)], 1.0, np.float32),
        top_k=column([g.top_k if s else 0 for g, s in zip(gens, sampled)], 0, np.int32),
        top_p=column([g.top_p if s else 1.0 for g, s in zip(gens, sampled)], 1.0, np.float32),
        min_p=column([g.min_p if s else 0.0 for g, s in zip(gens, sampled)], 0.0, np.float32),
        repetition_penalty=column([g.repetition_penalty for g in gens], 1.0, np.float32),
        greedy=column([not s for s in sampled], True, bool),
        seed=column([seed for _, seed, _ in rows], 0, np.uint32),
        step=column([generated for _, _, generated in rows], 0, np.int32),
        bad_ids=id_lists('bad_token_ids'), stop_ids=id_lists('stop_token_ids'),
        min_new=column([g.min_new_tokens or 0 for g in gens], 0, np.int32),
        want_logprobs=column([g.logprobs is not None for g in gens], False, bool))


def _mask_ids(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """-inf at each listed id of each row; -1 entries mask nothing."""
    vocab = logits.shape[-1]
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, jnp.where(ids < 0, vocab, ids)].set(-jnp.inf, mode='drop')


def apply_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """``logits`` [B, V] with -inf wherever ``bitmask`` [B, ceil(V / 32)] (int32; bit ``j`` of word
    ``i`` is token ``32 * i + j``) has a 0 bit: guided decoding's grammar mask (``lmdeploy_jax/guided.py``)."""
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :logits.shape[-1]].astype(bool)
    return jnp.where(allowed, logits, -jnp.inf)


def needs_general(sp: SamplingParams) -> bool:
    """Whether a call's (host) settings need the general sampler: some row samples or asks for
    logprobs. Padding rows are greedy without logprobs."""
    return bool(not np.all(sp.greedy) or np.any(sp.want_logprobs))


def _penalize(logits: jax.Array, history: jax.Array, valid: jax.Array, penalty: jax.Array) -> jax.Array:
    """Repetition penalty on the logits of the tokens in ``history`` [B, L] (valid entries).

    Gathers the history's logits, penalizes them and writes them back: O(B * L) work instead of
    passes over [B, vocab]. A token seen twice is written twice with the same value; rows with
    penalty 1 write their logits back unchanged."""
    vocab = logits.shape[-1]
    rows = jnp.arange(logits.shape[0])[:, None]
    ids = jnp.where(valid, history, vocab)
    seen = jnp.take_along_axis(logits, jnp.minimum(ids, vocab - 1), axis=-1)
    r = penalty[:, None]
    penalized = jnp.where(seen > 0, seen / r, seen * r)
    return logits.at[rows, ids].set(penalized, mode='drop')


def _warp(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """Temperature, then top-k, top-p and min-p masks (each over what the previous one left)."""
    vocab = logits.shape[-1]
    x = logits / sp.temperature[:, None]
    desc = -jnp.sort(-x, axis=-1)
    k = jnp.where((sp.top_k > 0) & (sp.top_k < vocab), sp.top_k, vocab)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    x = jnp.where(x < kth, -jnp.inf, x)
    desc = jnp.where(desc < kth, -jnp.inf, desc)
    # top-p: the nucleus is the ranks whose preceding mass is < p; keep every value >= its smallest
    sorted_probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    in_nucleus = (before < sp.top_p[:, None]) | (jnp.arange(vocab) == 0)
    smallest = jnp.min(jnp.where(in_nucleus, desc, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where((sp.top_p[:, None] < 1.0) & (x < smallest), -jnp.inf, x)
    probs = jax.nn.softmax(x, axis=-1)
    floor = sp.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where((sp.min_p[:, None] > 0.0) & (probs < floor), -jnp.inf, x)


def _draw(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """One token per row from softmax(logits) by the Gumbel-max trick, keyed per row and step."""
    def noise(seed, step):
        return jax.random.gumbel(jax.random.fold_in(jax.random.key(seed), step), logits.shape[-1:])
    gumbel = jax.vmap(noise)(sp.seed, sp.step)
    return jnp.argmax(logits + gumbel, axis=-1).astype(jnp.int32)


def sample(logits: jax.Array, history: Callable[[], tuple[jax.Array, jax.Array]],
           sp: SamplingParams, general: bool = True) -> SampleOutput:
    """Sample one token per row of float32 ``logits`` [B, V].

    ``history()`` gives each row's session tokens [B, L] and their validity [B, L] (for the
    penalty). ``general=False``: every row is greedy and none wants logprobs (``needs_general``
    is False); the logprob outputs are then zeros.
    """
    logits = _penalize(logits, *history(), sp.repetition_penalty)
    stop_ids = jnp.where((sp.step < sp.min_new)[:, None], sp.stop_ids, -1)
    logits = _mask_ids(_mask_ids(logits, sp.bad_ids), stop_ids)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    b = logits.shape[0]
    if not general:
        return SampleOutput(greedy, jnp.zeros(b, jnp.float32), jnp.zeros((b, MAX_LOGPROBS), jnp.float32),
                            jnp.zeros((b, MAX_LOGPROBS), jnp.int32))
    token = jnp.where(sp.greedy, greedy, _draw(_warp(logits, sp), sp))
    lp = jax.nn.log_softmax(logits, axis=-1)
    top, ids = jax.lax.top_k(lp, MAX_LOGPROBS)
    return SampleOutput(token, jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0], top, ids.astype(jnp.int32))


def logprob_dict(out: SampleOutput, row: int, n: int, step: int | None = None) -> dict[int, float]:
    """One row's reported logprobs from host copies of ``out``: the sampled token's, plus the top
    ``n``; ``step`` indexes the leading axis of a multi-step call's outputs."""
    if step is not None:
        out = SampleOutput(out.token[step], out.logprob[step], out.top_logprobs[step], out.top_ids[step])
    result = {int(out.token[row]): float(out.logprob[row])}
    result.update(zip(out.top_ids[row, :n].tolist(), out.top_logprobs[row, :n].tolist()))
    return result
