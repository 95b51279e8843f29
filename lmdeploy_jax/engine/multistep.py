"""Several decode steps in one compiled call: the host round trip is paid once per K tokens.

A decode call takes the batch of its first step ([B, 1]) and runs ``K`` steps in a ``fori_loop``
with a static trip count (XLA then needs no host check of the loop condition). Each step's sampled
tokens are the next step's input; positions, KV slots and context lengths advance on the device
from the block tables. The sampler sees ``step + k``, so seeds (``fold_in(key(seed), generated)``),
``min_new_tokens`` masking and the repetition penalty (the history is read from the pool's token
ids, where every fed token is written) are those of K single steps.

Rows may finish inside the call (stop id, length): the host drops their later tokens. Their
later KV writes land in their own reserved blocks (past ``num_cached``, rewritten when the
session continues) or, past the blocks the scheduler reserved, in block 0 (the block-table
entries there are 0) — never in another sequence's blocks.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..models import StepBatch
from .kv_pool import CacheState, RowSlots
from .sampler import MAX_LOGPROBS, SampleOutput, SamplingParams
from .scheduler import Carry
from .sequence import Sequence

StepFn = Callable[[object, CacheState, StepBatch, SamplingParams, RowSlots], tuple[CacheState, SampleOutput]]


def host_decode_batch(seqs: list[Sequence], num_rows: int, max_blocks: int, block_size: int,
                      carry: Carry | None = None) -> StepBatch:
    """Numpy first-step batch ([num_rows, 1]) of decoding sequences (one pending token each), or,
    with ``carry``, of the call chained behind one still in flight: each row's positions start
    ``carry.cached`` further, and the input tokens of rows fed by that call (``carry.source`` >= 0)
    are left 0 here (the call reads them from ``CacheState.last`` on the device).

    Vectorized over rows: the block tables are filled with one fancy-indexed assignment, not a
    Python loop per row (at batch 256 the loop costs milliseconds per step)."""
    n = len(seqs)
    pos = np.fromiter((s.num_cached for s in seqs), np.int32, n)
    source = np.full(n, -1, np.int32)
    if carry is not None:
        pos += np.asarray(carry.cached, np.int32)
        source[:] = carry.source
    lens = np.fromiter((len(s.blocks) for s in seqs), np.int64, n)
    tables = np.zeros((num_rows, max_blocks), np.int32)
    flat = np.fromiter(itertools.chain.from_iterable(s.blocks for s in seqs), np.int32, int(lens.sum()))
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    tables[np.repeat(np.arange(n), lens), np.arange(flat.size) - starts] = flat
    batch = StepBatch(token_ids=np.zeros((num_rows, 1), np.int32), positions=np.zeros((num_rows, 1), np.int32),
                      slot_mapping=np.zeros((num_rows, 1), np.int32), block_tables=tables,
                      context_lens=np.zeros(num_rows, np.int32), query_lens=np.zeros(num_rows, np.int32))
    batch.token_ids[:n, 0] = [s.tokens[s.num_cached] if src < 0 else 0 for s, src in zip(seqs, source.tolist())]
    batch.positions[:n, 0] = pos
    batch.slot_mapping[:n, 0] = tables[np.arange(n), pos // block_size] * block_size + pos % block_size
    batch.context_lens[:n] = pos + 1
    batch.query_lens[:n] = 1
    return batch


def _advance(batch: StepBatch, k: jax.Array, tokens: jax.Array, block_size: int) -> StepBatch:
    """Step ``k``'s batch: every live row one position further, feeding ``tokens``; padding rows
    (query_lens 0) stay at slot 0 with no context."""
    live = batch.query_lens > 0
    max_blocks = batch.block_tables.shape[1]
    pos = jnp.where(live, batch.positions[:, 0] + k, 0)
    index = pos // block_size
    block = jnp.take_along_axis(batch.block_tables, jnp.minimum(index, max_blocks - 1)[:, None], axis=1)[:, 0]
    block = jnp.where(index < max_blocks, block, 0)
    slot = jnp.where(live, block * block_size + pos % block_size, 0)
    context = jnp.where(live, jnp.minimum(pos + 1, max_blocks * block_size), 0)
    return StepBatch(tokens[:, None], pos[:, None], slot[:, None], batch.block_tables, context, batch.query_lens)


def decode_steps(step: StepFn, block_size: int, num_steps: int, params, cache: CacheState, batch: StepBatch,
                 sp: SamplingParams, rows: RowSlots, *bitmask: jax.Array) -> tuple[CacheState, SampleOutput]:
    """Run ``num_steps`` decode steps; the outputs gain a leading [num_steps] axis. The first
    step's input token of a row ``rows.from_device`` is the one last sampled for its slot.
    ``bitmask`` (a guided call's token bitmask, ``lmdeploy_jax/guided.py``) is passed to every step."""
    b = batch.num_rows
    outs = SampleOutput(jnp.zeros((num_steps, b), jnp.int32), jnp.zeros((num_steps, b), jnp.float32),
                        jnp.zeros((num_steps, b, MAX_LOGPROBS), jnp.float32),
                        jnp.zeros((num_steps, b, MAX_LOGPROBS), jnp.int32))

    def body(k, carry):
        cache, tokens, outs = carry
        cache, out = step(params, cache, _advance(batch, k, tokens, block_size),
                          dataclasses.replace(sp, step=sp.step + k), rows, *bitmask)
        outs = jax.tree.map(lambda buf, x: buf.at[k].set(x), outs, out)
        return cache, out.token, outs

    first = jnp.where(rows.from_device, cache.last[rows.slot], batch.token_ids[:, 0])
    cache, _, outs = jax.lax.fori_loop(0, num_steps, body, (cache, first, outs))
    return cache, outs
