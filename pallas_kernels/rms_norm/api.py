"""The RMSNorm the models call: the Pallas kernel on a GPU, the XLA reference elsewhere, behind one
function, so the models never change when an implementation does."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .._checks import require
from .._dispatch import choose_impl
from .reference import rms_norm_reference


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, impl: str | None = None) -> jax.Array:
    """Each row of ``x [..., hidden]`` divided by its root mean square (computed in float32, plus
    ``eps``), cast back to ``x``'s dtype, then multiplied by ``weight [hidden]``: Hugging Face's
    order, so the result has the dtype ``x * weight`` promotes to. ``eps``: a Python float.
    ``impl``: see ``pallas_kernels._dispatch`` (default: the Pallas kernel on a GPU)."""
    require(x.ndim >= 1 and jnp.issubdtype(x.dtype, jnp.floating),
            f'x must be a float array [..., hidden], got {x.dtype} {tuple(x.shape)}')
    require(tuple(weight.shape) == x.shape[-1:],
            f'weight must have shape ({x.shape[-1]},) to match x [..., {x.shape[-1]}], got {tuple(weight.shape)}')
    # -- implementation choice: the Pallas GPU kernel, else the reference --
    from . import pallas_gpu
    chosen = choose_impl(impl, pallas_gpu.supports(x, weight))
    if chosen != 'reference':
        return pallas_gpu.rms_norm_pallas(x, weight, float(eps), interpret=chosen == 'pallas_interpret')
    return rms_norm_reference(x, weight, eps)
