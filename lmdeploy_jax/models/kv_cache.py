"""The paged KV cache's storage: a K and a V stack ``[layers, kv_heads, num_blocks, block_size,
head_dim]`` (layers leading, so the model's scan over layers carries them whole; kv_heads next,
the axis tensor parallelism shards). ``quant_policy`` (LMDeploy's): 0 stores the model dtype; 8
or 4 stores each stack as ``kv_quant.QuantizedPages`` (uint8 codes ``[..., head_dim * bits // 8]``
and float32 scale and zero ``[..., 2]``, the same leading axes), which the kernels quantize on
write and dequantize on read. A 4-bit K stack holds the keys Hadamard-rotated after rope
(``kv_rotation.py``): queries are rotated alike, so attention over it is unchanged."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kv_quant import QUANT_BITS, QuantizedPages, empty_pages, kv_block_bytes

from .spec import ModelSpec

QUANT_POLICIES = (0, *QUANT_BITS)     # LMDeploy's quant_policy values: 0 (off), else the bits a stored value takes


def kv_cache_shape(spec: ModelSpec, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """The logical shape of the K stack (and of the V stack): a quantized stack's too."""
    return spec.num_layers, spec.num_kv_heads, num_blocks, block_size, spec.head_dim


def _bits(quant_policy: int) -> int | None:
    if type(quant_policy) is not int or quant_policy not in QUANT_POLICIES:
        raise ValueError(f'quant_policy must be one of {QUANT_POLICIES} (0: no KV quantization, 8: int8, '
                         f'4: int4), got {quant_policy!r}')
    return quant_policy or None


def kv_cache_leaves(spec: ModelSpec, num_blocks: int, block_size: int,
                    quant_policy: int = 0) -> jax.ShapeDtypeStruct | QuantizedPages:
    """The K stack's (and the V stack's) shapes and dtypes: one ``jax.ShapeDtypeStruct`` of the
    model dtype, or with ``quant_policy`` 8 or 4 a ``QuantizedPages`` of two (codes uint8, scale
    and zero float32). ValueError for another ``quant_policy``."""
    bits = _bits(quant_policy)
    *lead, head_dim = kv_cache_shape(spec, num_blocks, block_size)
    if bits is None:
        return jax.ShapeDtypeStruct((*lead, head_dim), spec.dtype)
    return jax.eval_shape(lambda: empty_pages((*lead, head_dim), bits))


def init_kv_caches(spec: ModelSpec, num_blocks: int, block_size: int,
                   quant_policy: int = 0) -> tuple[jax.Array | QuantizedPages, jax.Array | QuantizedPages]:
    """Zeroed K and V stacks on the default device (``QuantizedPages`` with ``quant_policy`` 8 or 4)."""
    bits = _bits(quant_policy)
    shape = kv_cache_shape(spec, num_blocks, block_size)
    if bits is None:
        return jnp.zeros(shape, spec.dtype), jnp.zeros(shape, spec.dtype)
    return empty_pages(shape, bits), empty_pages(shape, bits)


def kv_bytes_per_block(spec: ModelSpec, block_size: int, quant_policy: int = 0) -> int:
    """Device bytes one block takes across all layers, K and V (for sizing the pool); with
    ``quant_policy`` 8 or 4 the codes plus the float32 scale and zero of each token and KV head."""
    return kv_block_bytes(spec.num_layers, spec.num_kv_heads, block_size, spec.head_dim, spec.dtype,
                          _bits(quant_policy))
