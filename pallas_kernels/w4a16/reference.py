"""The XLA reference of the W4A16 matmul: dequantize the whole weight, then one matmul."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .layout import unpack_codes


def dequantize_weight(qweight: jax.Array, scales: jax.Array, zeros: jax.Array, dtype) -> jax.Array:
    """``W [K, N]`` in ``dtype``: ``(code - zero) * scale`` per group, computed in float32."""
    codes = unpack_codes(qweight).astype(jnp.float32)
    group = codes.shape[0] // scales.shape[0]
    expand = lambda a: jnp.repeat(a.astype(jnp.float32), group, axis=0)  # noqa: E731
    return ((codes - expand(zeros)) * expand(scales)).astype(dtype)


def w4a16_matmul_reference(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array) -> jax.Array:
    """``x [..., K] @ W [K, N]`` in ``x``'s dtype, accumulated in float32."""
    w = dequantize_weight(qweight, scales, zeros, x.dtype)
    return jnp.einsum('...k,kn->...n', x, w, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST).astype(x.dtype)
