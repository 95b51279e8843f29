"""XLA reference of RMSNorm, the order of operations Hugging Face uses: what the models compute on a
CPU."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm_reference(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Normalize in float32, cast back, then scale (the order Hugging Face uses)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)
