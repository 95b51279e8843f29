"""The paged KV cache's storage: per layer, a K and a V pool ``[kv_heads, num_blocks, block_size,
head_dim]`` in the model dtype (kv_heads leading, so tensor parallelism shards the first axis)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .spec import ModelSpec


def init_kv_caches(spec: ModelSpec, num_blocks: int, block_size: int,
                   sharding: jax.sharding.Sharding | None = None) -> list[tuple[jnp.ndarray, jnp.ndarray]]:
    """Zeroed pools, on the default device or created in place with ``sharding`` (each device
    allocating only its own KV heads)."""
    shape = (spec.num_kv_heads, num_blocks, block_size, spec.head_dim)
    return [(jnp.zeros(shape, spec.dtype, device=sharding), jnp.zeros(shape, spec.dtype, device=sharding))
            for _ in range(spec.num_layers)]


def kv_bytes_per_block(spec: ModelSpec, block_size: int) -> int:
    """Device bytes one block takes across all layers, K and V (for sizing the pool)."""
    return 2 * spec.num_layers * spec.num_kv_heads * block_size * spec.head_dim * spec.dtype.itemsize
