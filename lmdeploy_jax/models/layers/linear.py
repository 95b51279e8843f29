"""Projections and norms as ``nnx`` modules, their parameters optionally stacked over the layers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.w4a16.api import w4a16_matmul

INIT_STD = 0.02      # the initializer_range of a freshly made model (research use; loading replaces it)


def linear(x: jax.Array, p: dict) -> jax.Array:
    """A projection with Hugging Face's weight orientation: ``x @ p['w'].T`` (+ ``p['b']`` where
    present); of 4-bit weights (``p['qweight']``, ``p['scales']``, ``p['zeros']``:
    ``quantized_linear.QuantizedLinear``) by the W4A16 matmul."""
    if 'qweight' in p:
        y = w4a16_matmul(x, p['qweight'], p['scales'], p['zeros'])
    else:
        y = jnp.einsum('...i,oi->...o', x, p['w'])
    return y + p['b'] if 'b' in p else y


def layer_weights(p: dict, index: jax.Array | None) -> dict:
    """Layer ``index`` of each stacked ``[layers, ...]`` array in ``p`` (a slice cuBLAS and the
    kernels read in place), or ``p`` itself when ``index`` is None."""
    if index is None:
        return p
    return {k: jax.lax.dynamic_index_in_dim(v, index, keepdims=False) for k, v in p.items()}


def _leading(layers: int | None) -> tuple[int, ...]:
    return () if layers is None else (layers,)


class Linear(nnx.Module):
    """``w [layers, out, in]`` (Hugging Face's orientation) and, with ``bias``, ``b [layers, out]``;
    ``layers=None`` drops the leading axis."""

    def __init__(self, layers: int | None, out_features: int, in_features: int, dtype, *, bias: bool,
                 rngs: nnx.Rngs):
        shape = (*_leading(layers), out_features, in_features)
        self.w = nnx.Param(nnx.initializers.normal(INIT_STD)(rngs.params(), shape, dtype))
        self.b = nnx.Param(jnp.zeros((*_leading(layers), out_features), dtype)) if bias else None

    def weights(self, index: jax.Array | None = None) -> dict:
        """``{'w', 'b'?}`` of layer ``index`` (``layer_weights``), or the whole parameters when
        ``index`` is None."""
        p = {'w': self.w[...]}
        if self.b is not None:
            p['b'] = self.b[...]
        return layer_weights(p, index)

    def __call__(self, x: jax.Array, index: jax.Array | None = None) -> jax.Array:
        return linear(x, self.weights(index))


class RMSNorm(nnx.Module):
    """An RMSNorm's ``weight [layers, size]`` (``layers=None``: ``[size]``). The norm runs in the
    ``pallas_kernels.rms_norm`` ops, which read a layer's row of the stack in place; a family whose
    norm multiplies by ``1 + w`` (Gemma) stores ``1 + w`` (the weight map adds the one at load)."""

    def __init__(self, layers: int | None, size: int, dtype):
        self.weight = nnx.Param(jnp.ones((*_leading(layers), size), dtype))


def head_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm of each head ``x [..., head_dim]`` with ``weight [head_dim]``, as Qwen3's q/k norms:
    the statistics in float32, the normalized heads cast back to ``x``'s dtype before the weight."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight * normed.astype(x.dtype)).astype(x.dtype)
