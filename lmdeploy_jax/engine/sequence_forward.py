"""Whole-sequence forward passes off the serving path: ``get_ppl`` and ``token_states`` (what
``output_logits`` and ``output_last_hidden_state`` return).

A sequence is fed in chunks of at most ``PPL_MAX_CHUNK`` tokens, one row each, into KV blocks the
engine reserves for it (``Scheduler.reserve``), each chunk attending to the ones before it through
the pool. The chunk's token width is a power of two (at least 16), so few shapes compile; each is
compiled on first use, never at start-up.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from ..models import LoadedModel, StepBatch
from ..parallel import rules
from .kv_pool import CacheState

if TYPE_CHECKING:
    from .runner import ModelRunner

PPL_MAX_CHUNK = 512      # tokens per chunk: bounds its [T, vocab] float32 logits


def _ppl_chunk(model: LoadedModel, params, cache: CacheState, batch: StepBatch, targets: jax.Array,
               valid: jax.Array) -> tuple[CacheState, jax.Array]:
    """Sum of -log p(target) over the valid positions of a one-row chunk ([1, T] each)."""
    hidden, kv = model.forward(params, cache.kv, batch)
    logits = model.compute_logits(params, hidden).astype(jnp.float32)
    lp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    return dataclasses.replace(cache, kv=kv), jnp.sum(jnp.where(valid, nll, 0.0))


def _states_chunk(model: LoadedModel, with_logits: bool, params, cache: CacheState,
                  batch: StepBatch) -> tuple[CacheState, jax.Array, jax.Array | None]:
    """float32 final-normed hidden ``[1, T, hidden]`` and (``with_logits``) logits ``[1, T, vocab]``
    at every position of a one-row chunk, replicated over the mesh so that every process reads them."""
    hidden, kv = model.forward(params, cache.kv, batch)
    logits = model.compute_logits(params, hidden).astype(jnp.float32) if with_logits else None
    hidden = hidden.astype(jnp.float32)
    if model.mesh is not None:
        replicated = NamedSharding(model.mesh, rules.REPLICATED)
        hidden, logits = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, replicated), (hidden, logits))
    return dataclasses.replace(cache, kv=kv), hidden, logits


class SequenceForward:
    """The runner's whole-sequence passes; they run on the engine thread between steps, on the
    runner's params and pool (``runner.cache``, donated to each chunk and replaced by its result)."""

    def __init__(self, runner: 'ModelRunner'):
        self.runner = runner
        options = runner.options(('prefill', (1, PPL_MAX_CHUNK)))
        model = runner.model
        self._ppl = jax.jit(functools.partial(_ppl_chunk, model), donate_argnums=(1,), compiler_options=options)
        self._states = {with_logits: jax.jit(functools.partial(_states_chunk, model, with_logits),
                                             donate_argnums=(1,), compiler_options=options)
                        for with_logits in (False, True)}

    def _chunk_batch(self, chunk: list[int], start: int, blocks: list[int]) -> StepBatch:
        """The one-row batch feeding ``chunk`` at positions ``start...`` in ``blocks``."""
        from .runner import host_step_batch     # here: the runner imports this module
        width = 1 << (len(blocks) - 1).bit_length()
        t = max(16, 1 << (len(chunk) - 1).bit_length())
        return host_step_batch([(chunk, start, blocks)], (1, t), width, self.runner.block_size)

    def perplexity(self, ids: list[int], blocks: list[int]) -> float:
        """Mean cross-entropy of ``ids[1:]`` given their prefixes, computed in ``blocks`` of the pool."""
        runner, total = self.runner, 0.0
        for start in range(0, len(ids) - 1, PPL_MAX_CHUNK):
            chunk = ids[start:start + PPL_MAX_CHUNK]
            batch = self._chunk_batch(chunk, start, blocks)
            t = batch.token_ids.shape[1]
            targets = np.zeros((1, t), np.int32)
            following = ids[start + 1:start + 1 + len(chunk)]
            targets[0, :len(following)] = following
            valid = np.arange(t)[None, :] < len(following)
            with runner.precision():
                runner.cache, nll = self._ppl(runner.model.params, runner.cache, batch, targets, valid)
            total += float(nll)
        return total / (len(ids) - 1)

    def token_states(self, ids: list[int], blocks: list[int], logits: bool,
                     hidden: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``InferenceEngine.token_states`` of one sequence, computed in ``blocks`` of the pool:
        (logits float32 ``[n, vocab]`` if ``logits``, hidden float32 ``[n, hidden_size]`` if ``hidden``)."""
        runner, parts = self.runner, []
        for start in range(0, len(ids), PPL_MAX_CHUNK):
            chunk = ids[start:start + PPL_MAX_CHUNK]
            with runner.precision():
                runner.cache, h, lg = self._states[logits](runner.model.params, runner.cache,
                                                           self._chunk_batch(chunk, start, blocks))
            h, lg = jax.device_get((h, lg))
            parts.append((lg[0, :len(chunk)] if logits else None, h[0, :len(chunk)] if hidden else None))
        return tuple(np.concatenate(rows) if rows[0] is not None else None for rows in zip(*parts))
