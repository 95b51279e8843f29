"""The quantized KV cache's layout and arithmetic (``pallas_kernels.kv_quant``), and how far the
references over a quantized cache land from the float32 references over the unquantized one.

Error bounds, derived here and checked on fresh random rows:

- Round trip. A row's codes are ``c = round((x - low) * inv_scale)``, read back as
  ``(c - zero) * scale`` with ``zero = -low * inv_scale`` and ``scale * inv_scale = 1`` (to a few
  float32 ulps), so ``|x_hat - x| = |c - (x - low) * inv_scale| * scale <= scale / 2``, plus the
  float32 rounding of a few operations on numbers up to ``|x| + |low| + span``.
- Attention. With every dequantized K element within ``e_k = max scale_k / 2`` and V element
  within ``e_v = max scale_v / 2``, each score ``scale * q.k`` moves by at most
  ``delta = scale * sum|q| * e_k`` (a soft cap, 1-Lipschitz, moves it no more), so each softmax
  weight moves by a factor within ``exp(+-2 delta)`` and ``sum |p' - p| <= exp(2 delta) - 1``.
  The output ``sum p' v' - sum p v = sum p' (v' - v) + sum (p' - p) v`` then moves by at most
  ``e_v + (exp(2 delta) - 1) * max|v|``, per output element. This worst case is tight only when
  every element's error lines up with ``q``'s signs; for 8 bits it is within two orders of the
  errors seen, for 4 bits (``delta`` 17 x larger) it is vacuous. So the attention tests also bound
  the whole output's relative error: over 150 random draws (these rows, spans 0.5-2) it averaged
  0.8 % (max 1.3 %) with 8 bits and 13 % (max 19 %) with 4; the thresholds are 2.5 % and 30 %.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import kv_quant
from pallas_kernels.kv_quant import QuantizedPages, dequantize, pack_int4, quantize, unpack_int4
from pallas_kernels.prefill_attention.api import paged_prefill_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmark'))   # the decode-only op: an experiment
from experiments.paged_decode import paged_decode_attention  # noqa: E402

F32_EPS = float(np.finfo(np.float32).eps)


def random_rows(rng, shape, spans=(0.05, 4.0), offsets=20.0):
    """Rows of varied spans and offsets (asymmetric around 0), as real K/V heads are."""
    span = rng.uniform(*spans, (*shape[:-1], 1))
    offset = rng.uniform(-offsets, offsets, (*shape[:-1], 1))
    return (rng.standard_normal(shape) * span + offset).astype(np.float32)


@pytest.mark.parametrize('bits', kv_quant.QUANT_BITS)
@pytest.mark.parametrize('head_dim', [64, 128, 256])
def test_round_trip_within_half_a_step(rng, bits, head_dim):
    x = random_rows(rng, (3, 5, head_dim))
    codes, scale_zero = quantize(jnp.asarray(x), bits)
    assert codes.dtype == jnp.uint8 and codes.shape == (3, 5, head_dim * bits // 8)
    assert scale_zero.dtype == jnp.float32 and scale_zero.shape == (3, 5, 2)
    scale = np.asarray(scale_zero[..., :1])
    np.testing.assert_allclose(scale, (x.max(-1, keepdims=True) - x.min(-1, keepdims=True)) / kv_quant.qmax(bits),
                               rtol=4 * F32_EPS)
    back = np.asarray(dequantize(codes, scale_zero, bits))
    slack = 8 * F32_EPS * (np.abs(x) + np.abs(x).max(-1, keepdims=True) + scale * kv_quant.qmax(bits))
    assert (np.abs(back - x) <= scale / 2 + slack).all()
    # the whole code range is used: each row's min and max are codes 0 and qmax
    unpacked = np.asarray(unpack_int4(codes) if bits == 4 else codes)
    assert (unpacked.min(-1) == 0).all() and (unpacked.max(-1) == kv_quant.qmax(bits)).all()


@pytest.mark.parametrize('bits', kv_quant.QUANT_BITS)
def test_constant_rows_come_back_exactly(rng, bits):
    """A row with max == min has no span to divide: it is stored with scale 1, read back exactly."""
    x = np.broadcast_to(rng.uniform(-3, 3, (4, 1)), (4, 64)).astype(np.float32)
    codes, scale_zero = quantize(jnp.asarray(x), bits)
    np.testing.assert_array_equal(np.asarray(scale_zero[:, 0]), 1.0)
    np.testing.assert_array_equal(np.asarray(dequantize(codes, scale_zero, bits)), x)


def test_int4_packing_is_exact_and_lmdeploys_layout(rng):
    """Byte ``j`` holds element ``j`` (low nibble) and ``j + head_dim / 2`` (high nibble); unpacking
    inverts packing for every code, and the kernels' nibble addressing reads the same codes."""
    codes = rng.integers(0, 16, (7, 128), dtype=np.uint8)
    packed = np.asarray(pack_int4(jnp.asarray(codes)))
    assert packed.shape == (7, 64)
    np.testing.assert_array_equal(packed, codes[:, :64] | (codes[:, 64:] << 4))
    np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(packed))), codes)
    byte, shift = (np.asarray(a) for a in kv_quant.nibble_columns(128))
    np.testing.assert_array_equal((packed[:, byte[0]] >> shift[0]) & 15, codes)


def test_pool_bytes_and_empty_pages():
    """A quantized block holds the codes plus a float32 scale and zero per token and KV head."""
    bf16 = kv_quant.kv_block_bytes(30, 3, 64, 128, jnp.bfloat16)
    assert bf16 == 2 * 30 * 3 * 64 * 128 * 2
    assert kv_quant.kv_block_bytes(30, 3, 64, 128, jnp.bfloat16, bits=8) == 2 * 30 * 3 * 64 * (128 + 8)
    assert kv_quant.kv_block_bytes(30, 3, 64, 128, jnp.bfloat16, bits=4) == 2 * 30 * 3 * 64 * (64 + 8)
    pages = kv_quant.empty_pages((2, 3, 5, 16, 128), 4)
    assert pages.shape == (2, 3, 5, 16, 128) and pages.codes.shape == (2, 3, 5, 16, 64)
    assert pages.scale_zero.shape == (2, 3, 5, 16, 2) and not np.asarray(pages.codes).any()
    with pytest.raises(ValueError, match='bits must be one of'):
        kv_quant.empty_pages((2, 16, 128), 2)


# ---- the references over a quantized cache against the float32 ones ----------------------

def quantized_cache(rng, bits, head_dim, lens, block_size=16, kv_heads=2):
    """Float32 pools of random rows behind random tables, and the same quantized."""
    max_blocks = -(-max(lens) // block_size)
    num_blocks = 1 + len(lens) * max_blocks
    k, v = (random_rows(rng, (kv_heads, num_blocks, block_size, head_dim), (0.5, 2.0), 1.0) for _ in range(2))
    tables = rng.permutation(np.arange(1, num_blocks)).reshape(len(lens), max_blocks).astype(np.int32)
    quantized = tuple(QuantizedPages(*quantize(jnp.asarray(x), bits), bits) for x in (k, v))
    return (k, v), quantized, jnp.asarray(tables), jnp.asarray(lens, jnp.int32)


def attention_bound(q, quantized, v, scale):
    """``e_v + (exp(2 delta) - 1) * max|v|`` (module docstring) per query head ``[..., heads, 1]``,
    over every position of the pools (a superset of any query's keys)."""
    k_pages, v_pages = quantized
    e_k = float(np.asarray(k_pages.scale_zero[..., 0]).max()) / 2
    e_v = float(np.asarray(v_pages.scale_zero[..., 0]).max()) / 2
    delta = scale * np.abs(np.asarray(q, np.float64)).sum(-1, keepdims=True) * e_k
    return e_v + np.expm1(2 * delta) * np.abs(v).max() + 1e-5


RELATIVE = {8: 0.025, 4: 0.30}      # the output's relative error thresholds (module docstring)
# (bits, head_dim, sliding_window, logits_soft_cap)
BOUND_CASES = [(8, 64, None, None), (8, 128, 20, 2.0), (8, 256, None, 30.0), (4, 64, 20, None), (4, 128, None, None),
               (4, 256, 7, 2.0)]


def assert_within_quantization_error(out, ref, q, quantized, v, scale, bits):
    out, ref = np.asarray(out), np.asarray(ref)
    assert np.linalg.norm(out - ref) < RELATIVE[bits] * np.linalg.norm(ref)
    if bits == 8:
        assert (np.abs(out - ref) <= attention_bound(q, quantized, v, scale)).all()


@pytest.mark.parametrize('bits,head_dim,window,soft_cap', BOUND_CASES)
def test_quantized_references_stay_within_the_quantization_error(rng, bits, head_dim, window, soft_cap):
    """Decode and prefill references over the quantized cache against the float32 ones over the
    float cache (module docstring's bounds)."""
    lens, scale = [45, 17, 64], head_dim ** -0.5
    floats, quantized, tables, lens_ = quantized_cache(rng, bits, head_dim, lens)
    float_pools = tuple(jnp.asarray(x) for x in floats)
    options = dict(sliding_window=window, logits_soft_cap=soft_cap)
    q = jnp.asarray(rng.standard_normal((3, 4, head_dim)), jnp.float32)
    ref = paged_decode_attention(q, *float_pools, tables, lens_, scale, impl='reference', **options)
    out = paged_decode_attention(q, *quantized, tables, lens_, scale, impl='reference', **options)
    assert_within_quantization_error(out, ref, q, quantized, floats[1], scale, bits)

    q = jnp.asarray(rng.standard_normal((3, 9, 4, head_dim)), jnp.float32)
    qlens = jnp.asarray([9, 4, 9], jnp.int32)
    ref = paged_prefill_attention(q, *float_pools, tables, lens_, qlens, scale, impl='reference', **options)
    out = paged_prefill_attention(q, *quantized, tables, lens_, qlens, scale, impl='reference', **options)
    assert_within_quantization_error(out, ref, q, quantized, floats[1], scale, bits)
