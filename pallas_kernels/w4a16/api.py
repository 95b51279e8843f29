"""The W4A16 matmul the quantized linears call: the Pallas kernel on a GPU, the XLA reference
elsewhere (``pallas_kernels._dispatch``)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .._checks import require
from .._dispatch import choose_impl
from .layout import NIBBLES
from .reference import w4a16_matmul_reference


def w4a16_matmul(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array, *,
                 impl: str | None = None, config=None) -> jax.Array:
    """``x [..., K] @ W [K, N]`` in ``x``'s dtype (float32 accumulation), ``W`` given packed:
    ``qweight`` int32 ``[K // 8, N]`` in ``layout.py``'s tile layout, ``scales`` and ``zeros``
    ``[K // group, N]`` (float; zeros hold the integer zero points), ``W = (code - zero) * scale``.
    ValueError naming the argument when the shapes or dtypes disagree.
    ``impl``: see ``pallas_kernels._dispatch``; ``config``: the kernel's ``W4Config`` (None: chosen
    by shape)."""
    require(jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 1,
            f'x must be a float array [..., K], got {x.dtype} {tuple(x.shape)}')
    require(qweight.ndim == 2 and qweight.dtype == jnp.int32,
            f'qweight must be int32 [K // 8, N], got {qweight.dtype} {tuple(qweight.shape)}')
    k, n = qweight.shape[0] * NIBBLES, qweight.shape[1]
    require(x.shape[-1] == k, f'x has {x.shape[-1]} columns, but qweight packs K={k} rows')
    require(scales.ndim == 2 and scales.shape == zeros.shape and scales.shape[1] == n and scales.shape[0] > 0
            and k % scales.shape[0] == 0,
            f'scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be [K // group, N={n}] '
            f'with K={k}')
    from . import pallas_gpu
    chosen = choose_impl(impl, pallas_gpu.supports(x, qweight, scales))
    if chosen == 'reference':
        return w4a16_matmul_reference(x, qweight, scales, zeros)
    kernel = functools.partial(pallas_gpu.w4a16_matmul_pallas, config=config, interpret=chosen == 'pallas_interpret')
    return kernel(x.reshape(-1, k), qweight, scales, zeros).reshape(*x.shape[:-1], n)
