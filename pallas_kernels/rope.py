"""Rotary position embedding in Hugging Face's rotate-half form, in XLA: one function for the
models' prefill path and the decode-step op's reference, so both round the same way."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [..., heads, head_dim]`` by float32 ``cos``/``sin [..., head_dim]`` (the same
    leading axes, halves repeated), in ``x``'s dtype: ``x * cos + [-x2, x1] * sin``."""
    cos = cos[..., None, :].astype(x.dtype)
    sin = sin[..., None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
