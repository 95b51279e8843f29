"""The Pallas kernels over a quantized KV cache (``pallas_kernels.kv_quant``: LMDeploy's
``quant_policy`` 8 and 4) against their XLA references, in interpret mode on the CPU; with
``LMDEPLOY_JAX_KERNELS=pallas`` compiled and run on the GPU instead.

The pools are random float pools quantized (``pallas_cases.Pools``): where the float pools hold
NaN (slots no sequence owns, other layers of a stack) the quantized pools' zero point is NaN, so a
kernel that reads a position outside a row's context (or before its window) gives NaN. The
attention kernels must match the references over the same quantized pools; the write kernels
must store what the reference's ``kv_quant.quantize`` stores. On a GPU the kernels' float32
arithmetic may round a division or a fused multiply-add differently from XLA's, so a code may
land one step off where a value sits on a rounding boundary: the write checks allow that, for at
most 0.1 % of the codes.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_cases import (INTERPRET, KERNEL, KV_HEADS, SCALE, SM90_SHARED_BYTES, Pools, assert_kernels_alone,
                          assert_matches, compile_for_sm90, decode_steps_over_layers, lower_for_cuda, rope_tables,
                          window_lens, window_starts)

from pallas_kernels.decode_step_attention import pallas_gpu as step_gpu
from pallas_kernels.decode_step_attention.api import decode_step_attention
from pallas_kernels.decode_step_attention.reference import split_qkv
from pallas_kernels.kv_quant import QuantizedPages, dequantize, quantize, unpack_int4
from pallas_kernels.kv_write.api import write_kv
from pallas_kernels.prefill_attention import pallas_gpu as prefill_gpu
from pallas_kernels.prefill_attention.api import paged_prefill_attention
from pallas_kernels.rope import apply_rope

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmark'))   # the decode-only op: an experiment
from experiments import paged_decode as decode_gpu  # noqa: E402
from experiments.paged_decode import paged_decode_attention  # noqa: E402

STEP_LAYER, STEP_LAYERS = 1, 2


def quantized(pools, bits):
    """Float pools (a ``(k, v)`` pair) quantized per token and KV head; NaN rows get a NaN zero."""
    return tuple(QuantizedPages(*quantize(p, bits), bits) for p in pools)


def codes_of(pages):
    """A quantized pool's codes, one per element (4-bit ones unpacked), as int32."""
    return np.asarray(unpack_int4(pages.codes) if pages.bits == 4 else pages.codes, np.int32)


def assert_same_quantization(out, ref, where=(...,)):
    """``out`` and ``ref`` (QuantizedPages) hold the same codes and scales at ``where`` (an index
    into the pools' leading axes): codes at most one step apart, for at most 0.1 % of them (or
    one), scale and zero equal to float32 rounding (NaN where the reference has NaN)."""
    diff = np.abs(codes_of(out)[where] - codes_of(ref)[where])
    assert diff.max(initial=0) <= 1 and (diff > 0).sum() <= max(1, 1e-3 * diff.size), \
        f'codes differ: {np.argwhere(diff > 0)[:5]}'
    np.testing.assert_allclose(np.asarray(out.scale_zero)[where], np.asarray(ref.scale_zero)[where],
                               rtol=1e-6, atol=1e-6)


# ---- the KV write ---------------------------------------------------------------------------

@pytest.mark.parametrize('bits,head_dim,dtype,layers', [
    (8, 64, jnp.float32, 2), (4, 64, jnp.bfloat16, 2), (8, 128, jnp.bfloat16, None), (4, 128, jnp.float32, 2),
    (8, 256, jnp.bfloat16, 2), (4, 256, jnp.bfloat16, None)])
def test_kv_write_quantizes_as_the_reference(rng, bits, head_dim, dtype, layers):
    """New tokens at distinct random slots outside block 0, three padding tokens at slot 0 (they
    race there: slot 0 is left out), into layer 1 of a stack or one layer's pools; every other
    byte stays as it was."""
    block_size, num_blocks, n = 16, 6, 21
    shape = (KV_HEADS, num_blocks, block_size, head_dim)
    shape = shape if layers is None else (layers, *shape)
    pools = quantized([jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2)], bits)
    k_new, v_new = (jnp.asarray(rng.standard_normal((n, KV_HEADS, head_dim)), dtype) for _ in range(2))
    slots = rng.choice(np.arange(block_size, num_blocks * block_size), n, replace=False).astype(np.int32)
    slots[rng.choice(n, 3, replace=False)] = 0
    layer = None if layers is None else jnp.int32(1)
    out = write_kv(*pools, k_new, v_new, jnp.asarray(slots), layer, impl=KERNEL)
    ref = write_kv(*pools, k_new, v_new, jnp.asarray(slots), layer, impl='reference')
    for ours, theirs, before in zip(out, ref, pools):
        assert isinstance(ours, QuantizedPages) and ours.codes.shape == before.codes.shape
        keep = np.ones(ours.codes.shape[:-1], bool)
        keep[..., 0, 0] = False         # slot 0, where the padding tokens race
        assert_same_quantization(ours, theirs, keep)
        written = np.zeros(keep.shape, bool)
        written[..., slots // block_size, slots % block_size] = True
        if layers is not None:
            written[0] = False          # the other layer is never written
        untouched = ~written
        np.testing.assert_array_equal(np.asarray(ours.codes)[untouched], np.asarray(before.codes)[untouched])
        np.testing.assert_array_equal(np.asarray(ours.scale_zero)[untouched], np.asarray(before.scale_zero)[untouched])


# ---- paged decode and prefill attention -----------------------------------------------------

# (bits, head_dim, dtype, sliding_window, logits_soft_cap, launch: None for the op's API)
DECODE_CASES = [
    (8, 64, jnp.float32, None, None, decode_gpu.DecodeConfig(num_splits=3)),
    (8, 128, jnp.bfloat16, 20, 1.0, None),
    (4, 64, jnp.bfloat16, None, None, decode_gpu.DecodeConfig(tile_tokens=16, num_splits=2, page_tiles=True)),
    (4, 128, jnp.float32, 7, None, decode_gpu.DecodeConfig(num_splits=1)),
    (8, 256, jnp.bfloat16, 40, 2.0, decode_gpu.DecodeConfig(num_splits=1)),
    (4, 256, jnp.bfloat16, None, 2.0, None)]


@pytest.mark.parametrize('bits,head_dim,dtype,window,soft_cap,config', DECODE_CASES)
def test_decode_dequantizes_in_the_kernel(rng, bits, head_dim, dtype, window, soft_cap, config):
    """Rows of one position, empty, as long as the window, one longer, several pages longer;
    layer 1 of a stack whose other layer is poisoned."""
    block_size, group = 16, 2
    lens = window_lens(block_size, window or 9)
    options = dict(sliding_window=window, logits_soft_cap=soft_cap)
    pools = Pools(rng, lens, block_size, dtype, head_dim=head_dim, starts=window_starts(lens - 1, options))
    q = jnp.asarray(rng.standard_normal((len(lens), KV_HEADS * group, head_dim)), dtype)
    tables, lens_ = pools.tables()
    ref = paged_decode_attention(q, *quantized(pools.clean, bits), tables, lens_, SCALE, impl='reference', **options)
    stack = quantized(pools.stacked(1, 2), bits)
    if config is None:
        out = paged_decode_attention(q, *stack, tables, lens_, SCALE, jnp.int32(1), impl=KERNEL, **options)
    else:
        out = decode_gpu.paged_decode_attention_pallas(
            q, *stack, jnp.int32(1), tables, lens_, SCALE, None if window is None else jnp.int32(window), soft_cap,
            config=config, interpret=INTERPRET)
    assert out.dtype == dtype
    assert_matches(out, ref, dtype, lens == 0)


@pytest.mark.parametrize('bits,head_dim,dtype,window,soft_cap,config', [
    (8, 64, jnp.float32, None, None, prefill_gpu.PrefillConfig(block_rows=16, tile_tokens=16)),
    (4, 128, jnp.bfloat16, 24, 2.0, None),
    (8, 256, jnp.bfloat16, 7, None, None),
    (4, 64, jnp.float32, None, 1.0, prefill_gpu.PrefillConfig(block_rows=16, tile_tokens=16))])
def test_prefill_dequantizes_in_the_kernel(rng, bits, head_dim, dtype, window, soft_cap, config):
    """A chunk after a cached prefix (ending mid-page), a whole prompt, an empty row, a prompt of
    several pages; the chunk already written (quantized) in the pools."""
    block_size, group = 16, 2
    context_lens, query_lens = [3 * block_size + 5, 19, 0, 2 * block_size + 1], [9, 19, 0, 2 * block_size + 1]
    options = dict(sliding_window=window, logits_soft_cap=soft_cap)
    pools = Pools(rng, context_lens, block_size, dtype, head_dim=head_dim,
                  starts=window_starts(np.subtract(context_lens, query_lens), options))
    tokens = max(query_lens)
    q = jnp.asarray(rng.standard_normal((len(context_lens), tokens, KV_HEADS * group, head_dim)), dtype)
    qlens = jnp.asarray(query_lens, jnp.int32)
    tables, lens_ = pools.tables()
    ref = paged_prefill_attention(q, *quantized(pools.clean, bits), tables, lens_, qlens, SCALE, impl='reference',
                                  **options)
    stack = quantized(pools.stacked(0, 1), bits)
    if config is None:
        out = paged_prefill_attention(q, *stack, tables, lens_, qlens, SCALE, jnp.int32(0), impl=KERNEL, **options)
    else:
        out = prefill_gpu.paged_prefill_attention_pallas(
            q, *stack, jnp.int32(0), tables, lens_, qlens, SCALE, None if window is None else jnp.int32(window),
            soft_cap, config=config, interpret=INTERPRET)
    assert_matches(out, ref, dtype, np.arange(tokens)[None, :] >= qlens[:, None])


# ---- the decode step: rope, quantized KV write and attention in one kernel -------------------

def with_rows(pages, source, rows):
    """``pages`` with the token rows ``rows`` (an index) of ``source`` copied in."""
    codes, scale_zero = np.array(pages.codes), np.array(pages.scale_zero)
    codes[rows], scale_zero[rows] = np.asarray(source.codes)[rows], np.asarray(source.scale_zero)[rows]
    return QuantizedPages(jnp.asarray(codes), jnp.asarray(scale_zero), pages.bits)


@pytest.mark.parametrize('bits,head_dim,dtype,window,soft_cap,num_splits', [
    (8, 64, jnp.float32, None, None, 3), (4, 64, jnp.bfloat16, None, None, None),
    (8, 128, jnp.bfloat16, 20, 1.0, 1), (4, 256, jnp.bfloat16, 33, 2.0, None)])
def test_decode_step_quantizes_the_new_token(rng, bits, head_dim, dtype, window, soft_cap, num_splits):
    """The new token's V stored as the reference stores it; its K (roped in registers, which may
    round an ulp off XLA's rope) within a step of the reference's; nothing else in the stack
    written; the output equal to the reference attention over the pools the kernel left, so the
    token attended to itself as later steps will read it back."""
    block_size, group = 16, 2
    lens = window_lens(block_size, window or 9)
    options = dict(sliding_window=window, logits_soft_cap=soft_cap)
    pools = Pools(rng, lens, block_size, dtype, cached_lens=np.maximum(lens - 1, 0), head_dim=head_dim,
                  starts=window_starts(lens - 1, options))
    qkv = jnp.asarray(rng.standard_normal((len(lens), KV_HEADS * (group + 2) * head_dim)), dtype)
    cos, sin = rope_tables(rng, len(lens), head_dim)
    slots = np.asarray(pools.last_slots())
    rest = (jnp.int32(STEP_LAYER), jnp.asarray(slots), *pools.tables(), SCALE)
    stack = quantized(pools.stacked(STEP_LAYER, STEP_LAYERS), bits)
    if num_splits is None:
        out, *written = decode_step_attention(qkv, cos, sin, *stack, *rest, impl=KERNEL, **options)
    else:
        out, *written = step_gpu.decode_step_attention_pallas(
            qkv, cos, sin, *stack, *rest, None if window is None else jnp.int32(window), soft_cap,
            config=decode_gpu.DecodeConfig(tile_tokens=16, num_splits=num_splits), interpret=INTERPRET)
    _, *ref_written = decode_step_attention(qkv, cos, sin, *stack, *rest, impl='reference', **options)

    new = (STEP_LAYER, slice(None), slots // block_size, slots % block_size)
    for name, ours, theirs, before in zip('KV', written, ref_written, stack):
        old = np.ones(ours.codes.shape[:-1], bool)
        old[new] = False
        np.testing.assert_array_equal(np.asarray(ours.codes)[old], np.asarray(before.codes)[old],
                                      err_msg=f'{name} codes changed outside the new slots')
        np.testing.assert_array_equal(np.asarray(ours.scale_zero)[old], np.asarray(before.scale_zero)[old],
                                      err_msg=f'{name} scales changed outside the new slots')
        if name == 'V':
            assert_same_quantization(ours, theirs, new)
        else:
            ours_k, ref_k = (np.asarray(dequantize(p.codes[new], p.scale_zero[new], bits)) for p in (ours, theirs))
            steps = (np.asarray(ours.scale_zero[new][..., :1]) + np.asarray(theirs.scale_zero[new][..., :1])) / 2
            rope_ulp = 2 * float(jnp.finfo(dtype).eps) * np.abs(ref_k).max(-1, keepdims=True)
            assert (np.abs(ours_k - ref_k) <= steps + rope_ulp + 1e-6).all(), 'new K rows off by more than a step'

    q, _, _ = split_qkv(qkv, KV_HEADS, head_dim)
    clean = quantized(pools.stacked(STEP_LAYER, STEP_LAYERS, clean=True), bits)
    left = [with_rows(c, w, new) for c, w in zip(clean, written)]
    ref = paged_decode_attention(apply_rope(q, cos, sin), *left, *rest[2:4], SCALE, rest[0], impl='reference',
                                 **options)
    assert_matches(out, ref, dtype, lens == 0)


def test_quantized_pools_carried_through_a_scan_over_layers(rng):
    """As the model will call it: 4-bit pools carried through a jitted ``lax.scan`` whose index is
    the layer (traced), each layer its own qkv and sliding window (0: global); the kernel and the
    reference leave the same V pools and give the same outputs."""
    layers, lens, windows = 3, [30, 0, 9], jnp.asarray([7, 0, 20], jnp.int32)
    pools = Pools(rng, lens, 16, jnp.bfloat16, cached_lens=np.maximum(np.asarray(lens) - 1, 0))
    head_dim = pools.clean[0].shape[-1]
    qkv = jnp.asarray(rng.standard_normal((layers, 3, KV_HEADS * 6 * head_dim)), jnp.bfloat16)
    cos, sin = rope_tables(rng, 3, head_dim)
    stack = quantized([jnp.stack([p] * layers) for p in pools.clean], 4)

    (_, v_out), out = decode_steps_over_layers(pools, qkv, cos, sin, windows, stack, KERNEL)
    (_, v_ref), ref = decode_steps_over_layers(pools, qkv, cos, sin, windows, stack, 'reference')
    assert isinstance(v_out, QuantizedPages) and v_out.bits == 4
    assert_same_quantization(v_out, v_ref)
    assert_matches(out, ref, jnp.bfloat16, np.broadcast_to(np.asarray(lens) == 0, out.shape[:2]))


# ---- lowering and input checks --------------------------------------------------------------

@pytest.mark.parametrize('bits', [8, 4])
def test_quantized_ops_lower_to_their_kernels_alone(bits):
    """Lowered for CUDA (the Triton lowering of the nibble reads, the in-register quantization and
    int4 packing): only free reshapes around the kernels, no dequantized copy of the cache; the
    write and decode-step kernels alias all four pool arrays (codes and scales of K and V)."""
    shape, head_dim = jax.ShapeDtypeStruct, 128
    lead = (2, KV_HEADS, 8, 16)
    pages = QuantizedPages(shape((*lead, head_dim * bits // 8), jnp.uint8), shape((*lead, 2), jnp.float32), bits)
    layer, tables, lens = shape((), jnp.int32), shape((3, 4), jnp.int32), shape((3,), jnp.int32)
    step = functools.partial(step_gpu.decode_step_attention_pallas, scale=SCALE,
                             config=decode_gpu.DecodeConfig(num_splits=1))
    text = lower_for_cuda(step, shape((3, 6 * KV_HEADS * head_dim), jnp.bfloat16), shape((3, head_dim), jnp.float32),
                          shape((3, head_dim), jnp.float32), pages, pages, layer, lens, tables, lens)
    assert_kernels_alone(text, launches=1)
    for out in range(4):
        assert f'output_tuple_indices = [{out}], operand_index = {7 + out},' in text
    text = lower_for_cuda(lambda k, v, kn, vn, s, l: write_kv(k, v, kn, vn, s, l, impl='pallas'), pages, pages,
                          shape((5, KV_HEADS, head_dim), jnp.bfloat16), shape((5, KV_HEADS, head_dim), jnp.bfloat16),
                          shape((5,), jnp.int32), layer)
    assert_kernels_alone(text, launches=1)
    for out in range(4):
        assert f'output_tuple_indices = [{out}], operand_index = {4 + out},' in text
    q = shape((3, 4 * KV_HEADS, head_dim), jnp.bfloat16)
    assert_kernels_alone(lower_for_cuda(
        lambda q, k, v, t, n, l, w: paged_decode_attention(q, k, v, t, n, SCALE, l, sliding_window=w, impl='pallas'),
        q, pages, pages, tables, lens, layer, layer))
    assert_kernels_alone(lower_for_cuda(
        lambda q, k, v, t, n, l: paged_prefill_attention(q, k, v, t, n, n, SCALE, l, impl='pallas'),
        shape((3, 5, 4 * KV_HEADS, head_dim), jnp.bfloat16), pages, pages, tables, lens, layer), launches=1)


@pytest.mark.parametrize('bits', [8, 4])
def test_quantized_kernels_fit_sm90_at_head_dim_256(monkeypatch, tmp_path, bits):
    """Gemma's 256-wide heads over quantized pools, a traced window and a soft cap, through each
    op's API at its default launch: every kernel compiles for sm_90 within its shared memory per
    block (Triton's whole pipeline, without a GPU)."""
    shape, hd = jax.ShapeDtypeStruct, 256
    lead = (2, 8, 256, 64)
    pools = QuantizedPages(shape((*lead, hd * bits // 8), jnp.uint8), shape((*lead, 2), jnp.float32), bits)
    scalar, tables, lens = shape((), jnp.int32), shape((4, 64), jnp.int32), shape((4,), jnp.int32)
    options = dict(logits_soft_cap=50.0, impl='pallas')
    cases = [
        (lambda q, k, v, i, t, n, w: paged_decode_attention(q, k, v, t, n, SCALE, i, sliding_window=w, **options),
         (shape((4, 16, hd), jnp.bfloat16), pools, pools, scalar, tables, lens, scalar)),
        (lambda x, c, s_, k, v, i, sl, t, n, w: decode_step_attention(x, c, s_, k, v, i, sl, t, n, SCALE,
                                                                     sliding_window=w, **options),
         (shape((4, 32 * hd), jnp.bfloat16), shape((4, hd), jnp.float32), shape((4, hd), jnp.float32), pools, pools,
          scalar, lens, tables, lens, scalar)),
        (lambda q, k, v, i, t, n, m, w: paged_prefill_attention(q, k, v, t, n, m, SCALE, i, sliding_window=w,
                                                                **options),
         (shape((4, 128, 16, hd), jnp.bfloat16), pools, pools, scalar, tables, lens, lens, scalar)),
        (lambda k, v, kn, vn, sl, i: write_kv(k, v, kn, vn, sl, i, impl='pallas'),
         (pools, pools, shape((100, 8, hd), jnp.bfloat16), shape((100, 8, hd), jnp.bfloat16),
          shape((100,), jnp.int32), scalar))]
    for fn, args in cases:
        text, shared = compile_for_sm90(monkeypatch, tmp_path, fn, *args)
        assert_kernels_alone(text)
        assert shared and max(shared.values()) <= SM90_SHARED_BYTES, shared


def test_quantized_pools_are_checked_by_name(rng):
    """Mixed, mismatched or malformed quantized pools fail at trace time, naming the fault."""
    pools = quantized([jnp.asarray(rng.standard_normal((KV_HEADS, 4, 16, 64)), jnp.float32)] * 2, 8)
    int4 = quantized([jnp.asarray(rng.standard_normal((KV_HEADS, 4, 16, 64)), jnp.float32)] * 2, 4)
    new = jnp.asarray(rng.standard_normal((2, KV_HEADS, 64)), jnp.bfloat16)
    slots = jnp.asarray([16, 17], jnp.int32)
    with pytest.raises(ValueError, match='must both be quantized or both not'):
        write_kv(pools[0], jnp.zeros((KV_HEADS, 4, 16, 64)), new, new, slots)
    with pytest.raises(ValueError, match=r'k_pages \(8 bits\) and v_pages \(4 bits\)'):
        write_kv(pools[0], int4[1], new, new, slots)
    bad = QuantizedPages(pools[0].codes, pools[0].scale_zero.astype(jnp.bfloat16), 8)
    with pytest.raises(ValueError, match=r'k_pages.scale_zero must be float32'):
        write_kv(bad, pools[1], new, new, slots)
    bad = QuantizedPages(pools[0].codes.astype(jnp.int8), pools[0].scale_zero, 8)
    with pytest.raises(ValueError, match=r'k_pages.codes must be uint8'):
        write_kv(bad, pools[1], new, new, slots)
    with pytest.raises(ValueError, match='k_new must be a float dtype'):
        write_kv(*pools, new.astype(jnp.int32), new, slots)
    with pytest.raises(ValueError, match="q head_dim 32 does not match the pages' head_dim 64"):
        paged_decode_attention(jnp.ones((1, 4, 32)), *int4, jnp.ones((1, 2), jnp.int32), jnp.ones((1,), jnp.int32),
                               SCALE)
