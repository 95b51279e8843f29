"""Rotary position embedding in Hugging Face's rotate-half form, in XLA: one function for the
models' prefill path and the decode-step op's reference, so both round the same way."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [..., heads, head_dim]`` by float32 ``cos``/``sin [..., rotary_dim]`` (the same
    leading axes, halves repeated), in ``x``'s dtype: ``x * cos + [-x2, x1] * sin`` over the first
    ``rotary_dim`` dims (even, at most ``head_dim``), the rest passed through unchanged, as
    transformers' partial rotary models (Phi-3, StableLM) do."""
    rotary = cos.shape[-1]
    if rotary % 2 or rotary > x.shape[-1]:
        raise ValueError(f'rope tables of width {rotary} cannot rotate heads of {x.shape[-1]} dims '
                         '(an even width up to head_dim)')
    cos = cos[..., None, :].astype(x.dtype)
    sin = sin[..., None, :].astype(x.dtype)
    rot = x[..., :rotary]
    half = rotary // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos + rotated * sin
    return out if rotary == x.shape[-1] else jnp.concatenate([out, x[..., rotary:]], axis=-1)
