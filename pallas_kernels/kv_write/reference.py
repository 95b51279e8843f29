"""XLA reference of the KV write: one scatter per pool, indexed (layer, block, offset).

The pools are indexed in their own 5-D shape, not through a flattened ``[..., slots, d]`` view: with
a reshape around the scatter, XLA (CPU) keeps two versions of the stack inside the model's scan and
copies the whole pool several times per layer.
"""
from __future__ import annotations

import jax

from ..kv_quant import QuantizedPages, is_quantized, quantize


def _scatter(pages: jax.Array, new: jax.Array, slot_mapping: jax.Array, layer: jax.Array) -> jax.Array:
    block_size = pages.shape[3]
    # (layer, :, block, offset) indexing puts the token axis first: the update is [N, kv_heads, d] as given
    return pages.at[layer, :, slot_mapping // block_size, slot_mapping % block_size].set(new)


def write_pages(pages, new: jax.Array, slot_mapping: jax.Array, layer: jax.Array):
    """``new [N, kv_heads, head_dim]`` into its slots of one stacked pool; a quantized pool
    (``kv_quant.QuantizedPages``) gets the rows quantized, codes and scale/zero each scattered."""
    if not is_quantized(pages):
        return _scatter(pages, new, slot_mapping, layer)
    codes, scale_zero = quantize(new, pages.bits)
    return QuantizedPages(_scatter(pages.codes, codes, slot_mapping, layer),
                          _scatter(pages.scale_zero, scale_zero, slot_mapping, layer), pages.bits)


def write_kv_reference(k_pages, v_pages, k_new, v_new, slot_mapping, layer):
    """Store token ``n``'s K/V at slot ``slot_mapping[n]`` (= block * block_size + offset) of layer
    ``layer`` of the stacked pools ``[layers, kv_heads, num_blocks, block_size, head_dim]``
    (quantized, for ``kv_quant.QuantizedPages``)."""
    return write_pages(k_pages, k_new, slot_mapping, layer), write_pages(v_pages, v_new, slot_mapping, layer)
