"""The paged KV cache's storage: a K and a V stack ``[layers, kv_heads, num_blocks, block_size,
head_dim]`` in the model dtype (layers leading, so the model's scan over layers carries them
whole; kv_heads next, the axis tensor parallelism shards)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .spec import ModelSpec


def kv_cache_shape(spec: ModelSpec, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """The shape of the K stack (and of the V stack)."""
    return spec.num_layers, spec.num_kv_heads, num_blocks, block_size, spec.head_dim


def init_kv_caches(spec: ModelSpec, num_blocks: int, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Zeroed K and V stacks on the default device."""
    shape = kv_cache_shape(spec, num_blocks, block_size)
    return jnp.zeros(shape, spec.dtype), jnp.zeros(shape, spec.dtype)


def kv_bytes_per_block(spec: ModelSpec, block_size: int) -> int:
    """Device bytes one block takes across all layers, K and V (for sizing the pool)."""
    return 2 * spec.num_layers * spec.num_kv_heads * block_size * spec.head_dim * spec.dtype.itemsize
