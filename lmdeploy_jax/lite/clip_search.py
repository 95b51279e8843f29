"""The clipping search of AutoAWQ's ``auto_clip`` (``_search_best_clip``), in JAX: after smoothing,
each quantization group of a linear may quantize better when its weights are first clipped to a
smaller range ``[-m, m]``, trading the outliers' error for a finer grid for the rest. For each
group ``m`` is searched over ``max|w| * (1 - i / GRID)``, ``i < MAX_SHRINK * GRID``, for the least
squared error of the group's partial dot products with sampled input tokens."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .scale_search import GRID, pseudo_quantize

MAX_SHRINK = 0.5
SAMPLE_TOKENS = 512          # AutoAWQ's n_sample_token: the inputs are strided down to about this many


def sample_tokens(batches: list[jax.Array]) -> jax.Array:
    """``[tokens, in]``: the rows of the batches ``[..., in]`` strided to about ``SAMPLE_TOKENS``
    in all (each batch strided apart, so they are never concatenated whole)."""
    total = sum(x.size // x.shape[-1] for x in batches)
    step = max(1, total // SAMPLE_TOKENS)
    return jnp.concatenate([x.reshape(-1, x.shape[-1])[::step] for x in batches])


@partial(jax.jit, static_argnames=('bits', 'group_size'))
def clip_ranges(w: jax.Array, x: jax.Array, bits: int, group_size: int) -> jax.Array:
    """float32 ``[out, in // group_size]``: each group's clipping bound ``m`` for the weight
    ``w [out, in]`` read by the input tokens ``x [tokens, in]``."""
    out, width = w.shape
    groups = w.reshape(out, width // group_size, group_size)
    xg = x.reshape(x.shape[0], width // group_size, group_size)
    reference = jnp.einsum('ogs,tgs->ogt', groups, xg)
    largest = jnp.abs(groups).max(-1)

    def error(shrink):
        bound = largest * (1 - shrink)
        clipped = jnp.clip(groups, -bound[..., None], bound[..., None]).reshape(out, width)
        quantized = pseudo_quantize(clipped, bits, group_size).reshape(groups.shape)
        return jnp.mean(jnp.square(jnp.einsum('ogs,tgs->ogt', quantized, xg) - reference), axis=-1)

    shrinks = jnp.arange(int(MAX_SHRINK * GRID), dtype=jnp.float32) / GRID
    errors = jax.lax.map(error, shrinks)                         # [steps, out, groups]
    return largest * (1 - shrinks[jnp.argmin(errors, axis=0)])


def clip_weight(w: jax.Array, bounds: jax.Array) -> jax.Array:
    """``w [out, in]`` clipped to ``[-m, m]`` per group, ``bounds`` ``[out, in // group]``."""
    group_size = w.shape[1] // bounds.shape[1]
    bound = jnp.repeat(bounds, group_size, axis=1)
    return jnp.clip(w, -bound, bound)
