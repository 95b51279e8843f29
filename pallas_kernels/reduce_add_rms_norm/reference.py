"""The reference: XLA's all-reduce (``psum``), then the ``add_rms_norm`` op, which is what the models
run where the kernel cannot."""
from __future__ import annotations

import jax

from ..rms_norm.api import add_rms_norm


def reduce_add_rms_norm_reference(partial: jax.Array, residual: jax.Array, weight: jax.Array, eps: float,
                                  layer: jax.Array, axis_name: str) -> tuple[jax.Array, jax.Array]:
    return add_rms_norm(jax.lax.psum(partial, axis_name), residual, weight, eps, layer)
