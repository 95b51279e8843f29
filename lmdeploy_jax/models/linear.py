"""A projection with Hugging Face's weight orientation: ``x @ w.T`` (+ ``b`` where the checkpoint has one)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def linear(x: jax.Array, p: dict) -> jax.Array:
    y = jnp.einsum('...i,oi->...o', x, p['w'])
    return y + p['b'] if 'b' in p else y
