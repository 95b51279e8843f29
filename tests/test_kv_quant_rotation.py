"""The Hadamard rotation of queries and keys over int4 KV pools (``models/kv_rotation.py``): the
rotation against the Hadamard matrix built by Kronecker products, per block where head_dim is not a power of two; which
pools rotate. The engine-level effect (int4 perplexity within 5 %) is checked in
``test_kv_quant_engine.py``."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lmdeploy_jax.models.kv_rotation import hadamard_block, hadamard_rotate, rotates_keys
from pallas_kernels.kv_quant import empty_pages


def sylvester(n: int) -> np.ndarray:
    """The unscaled ``n x n`` Hadamard matrix of Sylvester's construction, ``H_2n = [[H, H], [H, -H]]``."""
    matrix = np.ones((1, 1))
    while len(matrix) < n:
        matrix = np.kron([[1, 1], [1, -1]], matrix)
    return matrix


@pytest.mark.parametrize('head_dim, block', [(64, 64), (128, 128), (96, 32), (80, 16)])
def test_hadamard_rotate_is_the_block_diagonal_orthonormal_hadamard(head_dim, block, rng):
    """Fresh random ``[3, 5, head_dim]`` rows times Sylvester's Hadamard matrix of the largest
    power-of-two block, scaled to orthonormal; q.k is kept, and rotating twice gives x back."""
    assert hadamard_block(head_dim) == block
    matrix = np.kron(np.eye(head_dim // block), sylvester(block)) / np.sqrt(block)
    x = rng.standard_normal((3, 5, head_dim)).astype(np.float32)
    y = rng.standard_normal((3, 5, head_dim)).astype(np.float32)
    rx, ry = np.asarray(hadamard_rotate(jnp.asarray(x))), np.asarray(hadamard_rotate(jnp.asarray(y)))
    np.testing.assert_allclose(rx, x @ matrix, atol=2e-6)
    np.testing.assert_allclose((rx * ry).sum(-1), (x * y).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(hadamard_rotate(jnp.asarray(rx))), x, atol=2e-6)
    assert np.abs(rx - x).max() > 0.1


def test_hadamard_rotate_keeps_the_dtype(rng):
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
    out = hadamard_rotate(x)
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape
    exact = np.asarray(x, np.float32) @ (sylvester(64) / 8.0)
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=2 ** -7, atol=2 ** -7)


def test_only_int4_pools_rotate():
    shape = (2, 3, 4, 16, 64)
    assert rotates_keys(empty_pages(shape, 4))
    assert not rotates_keys(empty_pages(shape, 8))
    assert not rotates_keys(jnp.zeros(shape, jnp.float32))
    with pytest.raises(ValueError, match='head_dim must be positive'):
        hadamard_block(0)
