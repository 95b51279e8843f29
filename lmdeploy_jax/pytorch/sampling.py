"""The sampling semantics every backend follows, written plainly in torch.

This is the specification the JAX engine's on-device sampler is checked against, so each step is
its own small function over float32 logits of shape [vocab] or [batch, vocab] (scalar settings
apply to every row). The order, for one position:

1. the last position's logits in float32;
2. repetition penalty over the distinct tokens the session holds (``repetition_penalty``);
3. ``bad_token_ids`` -> -inf, and ``stop_token_ids`` -> -inf while fewer than ``min_new_tokens``
   tokens were generated;
4. logprobs: ``log_softmax`` of the logits after 2-3 (before temperature);
5. greedy: argmax, lowest id on ties;
6. otherwise: temperature, then top-k, top-p and min-p masks (each over the probabilities left by
   the previous one), then one draw from the request's own ``torch.Generator``.

Ties are resolved by value, not by sort order: top-k keeps every logit >= the k-th largest and
top-p keeps every probability >= the smallest one of the nucleus, so the masks do not depend on
how a sort orders equal values.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from ..messages import GenerationConfig

NEG_INF = float('-inf')


def token_mask(token_ids: Iterable[int], vocab_size: int) -> torch.Tensor:
    """A [vocab] bool mask, True at each id in ``token_ids`` (repeats count once)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel():
        mask[ids] = True
    return mask


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalize seen tokens: a positive logit is divided by ``penalty``, any other multiplied by it."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def mask_tokens(logits: torch.Tensor, token_ids: Iterable[int]) -> torch.Tensor:
    """Set the given ids to -inf, so they can never be drawn."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if not ids.numel():
        return logits
    out = logits.clone()
    out[..., ids] = NEG_INF
    return out


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the logits >= the k-th largest of their row (k <= 0 or k >= vocab keeps all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose probability sums to >= p (at least one)."""
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs   # mass of the tokens ranked above
    in_nucleus = before < p
    in_nucleus[..., 0] = True
    smallest = torch.where(in_nucleus, sorted_probs, torch.inf).min(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < smallest, NEG_INF)


def min_p_mask(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most probable token's."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    floor = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < floor, NEG_INF)


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Step 6 before the draw: temperature, then the top-k, top-p and min-p masks in that order."""
    logits = logits / temperature
    return min_p_mask(top_p_mask(top_k_mask(logits, top_k), top_p), min_p)


def greedy_token(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the last axis; torch returns the first (lowest) index on ties."""
    return torch.argmax(logits, dim=-1)


def draw(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits), using (and advancing) ``generator``."""
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(probs.shape[:-1])


def top_logprobs(logprobs: torch.Tensor, token: int, n: int) -> dict[int, float]:
    """The reported logprobs of one position: the sampled token's, plus the top-n ids' ([vocab])."""
    out = {token: float(logprobs[token])}
    if n > 0:
        values, ids = torch.topk(logprobs, n)
        out.update(zip(ids.tolist(), values.tolist()))
    return out


def next_token(logits: torch.Tensor, gen_config: GenerationConfig, session_tokens: list[int],
               num_generated: int, generator: torch.Generator) -> tuple[int, dict[int, float] | None]:
    """Steps 2-6 for one request's [vocab] float32 logits: the token, and its logprobs when asked."""
    logits = apply_repetition_penalty(logits, token_mask(session_tokens, logits.shape[-1]),
                                      gen_config.repetition_penalty)
    logits = mask_tokens(logits, gen_config.bad_token_ids or ())
    if num_generated < (gen_config.min_new_tokens or 0):
        logits = mask_tokens(logits, gen_config.stop_token_ids or ())
    if gen_config.greedy:
        token = int(greedy_token(logits))
    else:
        token = int(draw(warp(logits, gen_config.temperature, gen_config.top_k, gen_config.top_p,
                              gen_config.min_p), generator))
    if gen_config.logprobs is None:
        return token, None
    return token, top_logprobs(torch.log_softmax(logits, dim=-1), token, gen_config.logprobs)
