"""XLA reference of the KV write: one scatter per pool over the flattened slot axis."""
from __future__ import annotations

import jax


def _scatter(pages: jax.Array, new: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    kv_heads, num_blocks, block_size, d = pages.shape
    flat = pages.reshape(kv_heads, num_blocks * block_size, d)
    return flat.at[:, slot_mapping].set(new.swapaxes(0, 1)).reshape(pages.shape)


def write_kv_reference(k_pages, v_pages, k_new, v_new, slot_mapping):
    """Store token ``n``'s K/V at slot ``slot_mapping[n]`` (= block * block_size + offset)."""
    return _scatter(k_pages, k_new, slot_mapping), _scatter(v_pages, v_new, slot_mapping)
