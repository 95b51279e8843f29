"""The Hadamard rotation of queries and keys over an int4 KV cache (``quant_policy=4``).

Why: a key row has a few channels far larger than the rest, and asymmetric 4-bit quantization per
row (``pallas_kernels.kv_quant``) spends its 16 levels on their span, so the small channels come
back as a handful of codes. An orthonormal rotation ``H`` spreads every channel over all of them
(QuaRot's observation), so the row's span shrinks relative to its norm and the rounding error of the
scores shrinks with it. Queries get the same rotation, and ``(H q) . (H k) = q . k``: the attention
is unchanged but for that smaller error, and the kernels are untouched (they store, read and attend
over whatever keys and queries they are given).

Where: after rope, on q and k alike (rope is a different rotation per position, so ``H`` cannot be
folded into the projection weights before it). Values are not rotated. Only 4-bit pools rotate;
unquantized and 8-bit pools store keys exactly as before.

``H``: the Walsh-Hadamard matrix of Sylvester's construction scaled by ``n ** -0.5`` (symmetric,
orthonormal, its own inverse), applied per block of ``n`` channels, ``n`` the largest power of two
dividing ``head_dim`` (the whole head at 64 or 128; blocks of 32 at 96, of 16 at 80). It is computed
as ``log2 n`` butterfly stages of adds and subtracts in float32, which XLA fuses with the rope
around it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kv_quant import is_quantized

ROTATED_BITS = 4


def rotates_keys(k_pages) -> bool:
    """Whether queries and keys attending over the K pool ``k_pages`` are Hadamard-rotated: for a
    ``QuantizedPages`` of ``ROTATED_BITS`` bits only (decided at trace time: ``bits`` is static)."""
    return is_quantized(k_pages) and k_pages.bits == ROTATED_BITS


def hadamard_block(head_dim: int) -> int:
    """The block size ``n`` of the rotation: the largest power of two dividing ``head_dim``."""
    if head_dim <= 0:
        raise ValueError(f'head_dim must be positive, got {head_dim}')
    return head_dim & -head_dim


def hadamard_rotate(x: jax.Array) -> jax.Array:
    """``x [..., head_dim]`` (any float dtype) times the block-diagonal orthonormal Hadamard matrix
    (see the module docstring), computed in float32 and returned in ``x``'s dtype and shape.
    Applying it twice gives ``x`` back (up to float32 rounding)."""
    *lead, d = x.shape
    n = hadamard_block(d)
    y = x.astype(jnp.float32).reshape(*lead, d // n, n)
    half = 1
    while half < n:          # stage: within each pair of adjacent runs of ``half``, (a, b) -> (a + b, a - b)
        y = y.reshape(*lead, d // n, n // (2 * half), 2, half)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        half *= 2
    return (y.reshape(*lead, d) * (n ** -0.5)).astype(x.dtype)
