"""``PagedRun``: a model's decoder over sequences in a paged KV cache, outside the engine (the model
tests and the family tests' engine child share it; no torch or transformers imported)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lmdeploy_jax.models import StepBatch


class PagedRun:
    """Sequences in a paged cache behind random, non-contiguous block tables, plus a padding row;
    ``step`` feeds each row its next ``n`` tokens and returns their logits."""

    def __init__(self, model, prompts, block_size=4, seed=0):
        self.model, self.prompts, self.block_size = model, prompts, block_size
        max_blocks = -(-max(map(len, prompts)) // block_size)
        num_blocks = 1 + max_blocks * len(prompts) + 3
        blocks = np.random.default_rng(seed).permutation(np.arange(1, num_blocks))
        self.tables = np.zeros((len(prompts) + 1, max_blocks), np.int32)   # last row: padding
        for i in range(len(prompts)):
            self.tables[i] = blocks[i * max_blocks:(i + 1) * max_blocks]
        self.kv = model.init_kv_caches(model.spec, num_blocks, block_size)
        self.done = [0] * len(prompts)
        self._forward = jax.jit(model.forward)
        self._logits = jax.jit(model.compute_logits)

    def step(self, counts, tokens_per_row):
        rows = len(self.prompts) + 1
        ids, pos, slots = (np.zeros((rows, tokens_per_row), np.int32) for _ in range(3))
        ctx, qlen = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        for i, n in enumerate(counts):
            p = np.arange(self.done[i], self.done[i] + n)
            ids[i, :n] = np.asarray(self.prompts[i])[p]
            pos[i, :n] = p
            slots[i, :n] = self.tables[i, p // self.block_size] * self.block_size + p % self.block_size
            if n:
                ctx[i], qlen[i] = self.done[i] + n, n
            self.done[i] += n
        batch = StepBatch(*map(jnp.asarray, (ids, pos, slots, self.tables, ctx, qlen)))
        hidden, self.kv = self._forward(self.model.params, self.kv, batch)
        logits = np.asarray(self._logits(self.model.params, hidden))
        return [logits[i, :n] for i, n in enumerate(counts)]
