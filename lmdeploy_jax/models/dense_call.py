"""A model called on plain token ids, without the engine: one prefill of every row over a fresh
paged cache, for research use (inspecting logits, ``jax.grad`` through the model)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .kv_cache import init_kv_caches
from .step_batch import StepBatch

BLOCK_SIZE = 16


def prefill_batch(token_ids: jax.Array, block_size: int = BLOCK_SIZE) -> tuple[StepBatch, int]:
    """The ``StepBatch`` that prefills each row of ``token_ids [B, T]`` (int32) from position 0,
    row ``b`` in its own blocks ``1 + b * n ... (b + 1) * n`` (block 0 is padding's), and the
    number of blocks the cache needs."""
    b, t = token_ids.shape
    n = -(-t // block_size)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    tables = 1 + jnp.arange(b * n, dtype=jnp.int32).reshape(b, n)
    slots = jnp.take_along_axis(tables, positions // block_size, axis=1) * block_size + positions % block_size
    lens = jnp.full((b,), t, jnp.int32)
    return StepBatch(token_ids.astype(jnp.int32), positions, slots, tables, lens, lens), 1 + b * n


def token_logits(model, token_ids: jax.Array) -> jax.Array:
    """float32 logits ``[B, T, vocab]`` of the ``nnx`` model ``model`` (``layers.decoder.CausalLM``)
    at every position of ``token_ids [B, T]``, each row attending causally to itself alone. The
    attention kernels are those ``LMDEPLOY_JAX_KERNELS`` selects; take gradients with the XLA
    references (the default off a GPU; ``LMDEPLOY_JAX_KERNELS=reference`` on one), since the Pallas
    kernels define no derivative."""
    token_ids = jnp.asarray(token_ids)
    if token_ids.ndim != 2 or not jnp.issubdtype(token_ids.dtype, jnp.integer):
        raise ValueError(f'token_ids must be an integer array [batch, tokens], got {token_ids.dtype} '
                         f'{tuple(token_ids.shape)}')
    batch, num_blocks = prefill_batch(token_ids)
    hidden, _ = model(init_kv_caches(model.spec, num_blocks, BLOCK_SIZE), batch)
    return model.logits(hidden)
