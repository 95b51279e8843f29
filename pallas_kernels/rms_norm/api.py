"""The RMSNorm the models call: the Pallas kernel on a GPU, the XLA reference elsewhere, behind one
function, so the models never change when an implementation does."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .._checks import require, stacked_weight
from .._dispatch import choose_impl
from .reference import rms_norm_reference


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, layer: jax.Array | int | None = None, *,
             impl: str | None = None) -> jax.Array:
    """Each row of ``x [..., hidden]`` divided by its root mean square (computed in float32, plus
    ``eps``), cast back to ``x``'s dtype, then multiplied by ``weight [hidden]``: Hugging Face's
    order, so the result has the dtype ``x * weight`` promotes to. ``eps``: a Python float.

    ``weight`` may also be every layer's weights stacked, ``[layers, hidden]``, with ``layer`` (an
    int32 scalar) the one to use: inside the models' layer loop the kernel then reads its row in
    place, where slicing it out first would cost a copy per norm.
    ``impl``: see ``pallas_kernels._dispatch`` (default: the Pallas kernel on a GPU)."""
    kernel, weight, layer = _choose(x, weight, layer, impl)
    if kernel is not None:
        return kernel(x, weight, layer, float(eps))
    return rms_norm_reference(x, weight[layer], eps)


def add_rms_norm(x: jax.Array, residual: jax.Array, weight: jax.Array, eps: float,
                 layer: jax.Array | int | None = None, *, impl: str | None = None) -> tuple[jax.Array, jax.Array]:
    """``(s, rms_norm(s, weight, eps, layer))`` for ``s = x + residual`` in ``x``'s dtype: a
    decoder layer's residual add and the RMSNorm after it as one op (on a GPU one kernel; XLA
    would launch the add on its own).
    ``residual``: ``x``'s shape and dtype; the rest as in ``rms_norm``."""
    require(residual.shape == x.shape and residual.dtype == x.dtype,
            f'residual must match x {x.dtype} {tuple(x.shape)}, got {residual.dtype} {tuple(residual.shape)}')
    kernel, weight, layer = _choose(x, weight, layer, impl)
    if kernel is not None:
        return kernel(x, weight, layer, float(eps), residual=residual)
    s = (x + residual).astype(x.dtype)
    return s, rms_norm_reference(s, weight[layer], eps)


def _choose(x: jax.Array, weight: jax.Array, layer, impl: str | None):
    """Validate ``x``, the weights and the layer; return the Pallas kernel to call (None: the
    reference; see ``pallas_kernels._dispatch``), the weights as ``[layers, hidden]`` and the
    int32 layer to use."""
    require(x.ndim >= 1 and jnp.issubdtype(x.dtype, jnp.floating),
            f'x must be a float array [..., hidden], got {x.dtype} {tuple(x.shape)}')
    weight, layer = stacked_weight(weight, layer, x.shape[-1])
    # -- implementation choice: the Pallas GPU kernel, else the reference --
    from . import pallas_gpu
    chosen = choose_impl(impl, pallas_gpu.supports(x, weight))
    if chosen == 'reference':
        return None, weight, layer
    return functools.partial(pallas_gpu.rms_norm_pallas, interpret=chosen == 'pallas_interpret'), weight, layer
