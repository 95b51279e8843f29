"""The decode step kernel (``pallas_kernels/decode_step_attention/pallas_gpu.py``: rope, KV write and
attention in one kernel) against its XLA reference, and the flash-decoding pieces it launches with
(``pallas_kernels/_flash_decoding.py``: the split count, the splits' combine).

It reads pools whose new-token slots are poisoned too (the kernel takes the new token from
registers, never from the pool), inside a stack whose other layers are NaN; it must leave every
byte but the new tokens' slots as it was. The harness (interpret mode or the GPU, poisoned pools)
is ``pallas_cases``."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_cases import (
    HEAD_DIM,
    INTERPRET,
    KERNEL,
    KV_HEADS,
    PAGE_TILE_CASES,
    SCALE,
    TOLERANCE,
    Pools,
    assert_kernels_alone,
    assert_matches,
    decode_steps_over_layers,
    lower_for_cuda,
    relative_error,
    rope_tables,
    window_lens,
    window_starts,
)

from pallas_kernels.decode_step_attention import pallas_gpu as step_gpu
from pallas_kernels.decode_step_attention.api import decode_step_attention
from pallas_kernels._flash_decoding import DecodeConfig, choose_num_splits, combine_splits

STEP_LAYER, STEP_LAYERS = 1, 3


def decode_step_case(seed, block_size, group, context_lens, dtype, head_dim=HEAD_DIM, **options):
    """Pools cached up to each row's new token (its slot poisoned, and every position before the
    row's sliding window), as layer ``STEP_LAYER`` of a NaN stack; the step's inputs ``(qkv, cos,
    sin)`` and the rest ``(layer, slots, tables, lens, scale)``; the reference's output over clean
    pools, and its pools written from the poisoned ones (what the kernel must leave). At most one
    empty row, so no two rows race for slot 0. ``seed`` and ``options`` as
    ``pallas_cases.decode_case``'s."""
    rng = np.random.default_rng(seed)
    lens = np.asarray(context_lens, np.int32)
    pools = Pools(rng, lens, block_size, dtype, cached_lens=np.maximum(lens - 1, 0), head_dim=head_dim,
                  starts=window_starts(lens - 1, options))
    qkv = jnp.asarray(rng.standard_normal((len(lens), KV_HEADS * (group + 2) * head_dim)), dtype)
    step = (qkv, *rope_tables(rng, len(lens), head_dim))
    rest = (jnp.int32(STEP_LAYER), pools.last_slots(), *pools.tables(), SCALE)
    ref_out, *_ = decode_step_attention(*step, *pools.stacked(STEP_LAYER, STEP_LAYERS, clean=True), *rest,
                                        impl='reference', **options)
    _, *ref_pools = decode_step_attention(*step, *pools.stacked(STEP_LAYER, STEP_LAYERS), *rest, impl='reference',
                                          **options)
    return pools, step, rest, ref_out, ref_pools


def assert_step_written(out_pools, ref_pools, slots, block_size, dtype):
    """Every element as the reference leaves it (NaN poison included: other layers, unowned
    slots), except the new tokens' K rows, which need only be close: the rope's products round
    alike, but XLA may fuse the reference's into FMAs (an ulp in float32)."""
    slots = np.asarray(slots)
    rows = (STEP_LAYER, slice(None), slots // block_size, slots % block_size)
    for name, out, ref in zip('KV', out_pools, ref_pools):
        out, ref = (np.array(x.astype(jnp.float32)) for x in (out, ref))
        new_out, new_ref = out[rows], ref[rows]
        out[rows] = ref[rows] = 0
        np.testing.assert_array_equal(out, ref, err_msg=f'{name} pool changed outside the new slots')
        assert not np.isnan(new_out).any(), f'new {name} rows not written'
        if name == 'K':
            assert relative_error(new_out, new_ref) < TOLERANCE[dtype]
        else:
            np.testing.assert_array_equal(new_out, new_ref, err_msg='new V rows differ')


@pytest.mark.parametrize('block_size,group,dtype,num_splits', [
    (16, 1, jnp.float32, 1), (32, 4, jnp.bfloat16, 3), (64, 8, jnp.float16, 1), (128, 4, jnp.float32, 8),
    (16, 8, jnp.bfloat16, None)])
def test_decode_step_matches_reference(block_size, group, dtype, num_splits):
    """Rows of only the new token (1), a cache ending a page (block + 1), mid-page, one empty
    row, several tiles; one split (the kernel normalises), forced splits over small tiles
    (empty splits), or the op's API with its default launch (as many splits as tiles here)."""
    lens = [1, block_size + 1, 0, 2 * block_size, 5 * block_size - 7, 2]
    pools, step, rest, ref_out, ref_pools = decode_step_case(block_size * group, block_size, group, lens, dtype)
    stacked = pools.stacked(STEP_LAYER, STEP_LAYERS)
    if num_splits is None:
        out, *out_pools = decode_step_attention(*step, *stacked, *rest, impl=KERNEL)
    else:
        config = DecodeConfig(tile_tokens=16, num_splits=num_splits)
        out, *out_pools = step_gpu.decode_step_attention_pallas(*step, *stacked, *rest, config=config,
                                                                interpret=INTERPRET)
    assert out.dtype == dtype
    assert_matches(out, ref_out, dtype, np.asarray(lens) == 0)
    assert_step_written(out_pools, ref_pools, rest[1], block_size, dtype)


@pytest.mark.parametrize('block_size,tile_tokens,dtype,num_splits', PAGE_TILE_CASES)
def test_decode_step_page_tiles(block_size, tile_tokens, dtype, num_splits):
    """``page_tiles`` in the decode step: caches ending at the table's end, mid-tile, mid-page,
    empty (only the new token), and an empty row."""
    lens = [3 * block_size, 1, block_size + 2, 0, 2 * block_size - 5]
    pools, step, rest, ref_out, ref_pools = decode_step_case(block_size - num_splits, block_size, 3, lens, dtype)
    config = DecodeConfig(tile_tokens=tile_tokens, num_splits=num_splits, page_tiles=True)
    out, *out_pools = step_gpu.decode_step_attention_pallas(*step, *pools.stacked(STEP_LAYER, STEP_LAYERS), *rest,
                                                            config=config, interpret=INTERPRET)
    assert_matches(out, ref_out, dtype, np.asarray(lens) == 0)
    assert_step_written(out_pools, ref_pools, rest[1], block_size, dtype)


def test_decode_step_in_a_scan_over_layers(rng):
    """As the model calls it: the pools carried through a jitted ``lax.scan`` whose index is the
    layer (traced), each layer its own qkv and sliding window (traced; 0: a global layer, as
    Gemma's alternate), writing the same slots of its own layer."""
    layers, lens, windows = 3, [30, 0, 9], jnp.asarray([7, 0, 20], jnp.int32)
    pools = Pools(rng, lens, 16, jnp.bfloat16, cached_lens=np.maximum(np.asarray(lens) - 1, 0))
    qkv = jnp.asarray(rng.standard_normal((layers, 3, KV_HEADS * 6 * HEAD_DIM)), jnp.bfloat16)
    cos, sin = rope_tables(rng, 3)
    stack = tuple(jnp.stack([p] * layers) for p in pools.clean)

    (k_out, v_out), out = decode_steps_over_layers(pools, qkv, cos, sin, windows, stack, KERNEL)
    (k_ref, v_ref), ref = decode_steps_over_layers(pools, qkv, cos, sin, windows, stack, 'reference')
    assert_matches(out, ref, jnp.bfloat16, np.broadcast_to(np.asarray(lens) == 0, out.shape[:2]))
    np.testing.assert_array_equal(np.asarray(v_out, np.float32), np.asarray(v_ref, np.float32))
    assert relative_error(np.asarray(k_out, np.float32), np.asarray(k_ref, np.float32)) < TOLERANCE[jnp.bfloat16]


@pytest.mark.parametrize('block_size,group,window,soft_cap,dtype,head_dim,config', [
    (16, 4, 20, 1.0, jnp.float32, HEAD_DIM, DecodeConfig(tile_tokens=16, num_splits=3, page_tiles=True)),
    (16, 1, 1, 0.5, jnp.float16, HEAD_DIM, DecodeConfig(tile_tokens=16, num_splits=2)),
    (32, 2, 33, 2.0, jnp.bfloat16, 256, None)])
def test_decode_step_window_and_soft_cap(rng, block_size, group, window, soft_cap, dtype, head_dim, config):
    """The new token (always inside its window) and the cached positions in the window, or the
    token alone (a window of 1); the rows are ``window_lens``'."""
    lens = window_lens(block_size, window)
    options = dict(sliding_window=window, logits_soft_cap=soft_cap)
    pools, step, rest, ref_out, ref_pools = decode_step_case(rng, block_size, group, lens, dtype, head_dim, **options)
    stacked = pools.stacked(STEP_LAYER, STEP_LAYERS)
    if config is None:
        out, *out_pools = decode_step_attention(*step, *stacked, *rest, impl=KERNEL, **options)
    else:
        out, *out_pools = step_gpu.decode_step_attention_pallas(*step, *stacked, *rest, jnp.int32(window), soft_cap,
                                                                config=config, interpret=INTERPRET)
    assert_matches(out, ref_out, dtype, lens == 0)
    assert_step_written(out_pools, ref_pools, rest[1], block_size, dtype)


def xla_combine(o, m, sums):
    """The splits' combine as an XLA formula: the splits' outputs ``o``, score maxima ``m``
    (log2) and exponential sums ``sums``."""
    m_max = m.max(axis=1, keepdims=True)
    w = jnp.exp2(m - jnp.where(jnp.isfinite(m_max), m_max, 0.0))
    total = (w * sums).sum(axis=1)
    return (w[..., None] * o).sum(axis=1) / jnp.where(total > 0, total, 1.0)[..., None]


@pytest.mark.parametrize('num_splits,dtype', [(3, jnp.bfloat16), (8, jnp.float32)])
def test_combine_splits_matches_the_xla_formula(rng, num_splits, dtype):
    """Random partials with empty splits (max -inf, sum 0) scattered about, and one row whose
    splits are all empty (zeros out)."""
    batch, heads = 3, 5
    o = rng.standard_normal((batch, num_splits, heads, HEAD_DIM)).astype(np.float32)
    m = (4 * rng.standard_normal((batch, num_splits, heads))).astype(np.float32)
    sums = rng.uniform(0.5, 3.0, (batch, num_splits, heads)).astype(np.float32)
    empty = rng.random(m.shape) < 0.3
    empty[1] = True
    m[empty], sums[empty], o[empty] = -np.inf, 0.0, 0.0
    out = combine_splits(*map(jnp.asarray, (o, m, sums)), dtype, interpret=INTERPRET)
    assert out.dtype == dtype
    assert_matches(out, xla_combine(o, m, sums), dtype, empty=np.arange(batch) == 1)


def test_choose_num_splits_fills_the_device():
    config = DecodeConfig(target_programs=264)
    assert choose_num_splits(64, 8, max_tiles=32, config=config) == 1
    assert choose_num_splits(1, 8, max_tiles=32, config=config) == 32
    assert choose_num_splits(1, 8, max_tiles=4, config=config) == 4
    assert choose_num_splits(8, 8, max_tiles=32, config=config) == 5


@pytest.mark.parametrize('config,launches', [(DecodeConfig(), 2), (DecodeConfig(num_splits=1), 1),
                                             (DecodeConfig(tile_tokens=16, page_tiles=True), 2)],
                         ids=['splits', 'one-split', 'page-tiles'])
def test_decode_step_lowers_to_its_kernels_alone(config, launches):
    """Lowered for CUDA (Triton IR, checked without a GPU): around the kernels only free
    reshapes, nothing XLA must launch; two launches (the step and the split combine), or one with
    one split; the pools aliased to the outputs; ``page_tiles`` (16-position tiles of
    16-position pages) lowers too."""
    shape = jax.ShapeDtypeStruct
    pools = shape((4, KV_HEADS, 8, 16, HEAD_DIM), jnp.bfloat16)
    step = (shape((1, 6 * KV_HEADS * HEAD_DIM), jnp.bfloat16), shape((1, HEAD_DIM), jnp.float32),
            shape((1, HEAD_DIM), jnp.float32), pools, pools, shape((), jnp.int32), shape((1,), jnp.int32),
            shape((1, 64), jnp.int32), shape((1,), jnp.int32))
    text = lower_for_cuda(functools.partial(step_gpu.decode_step_attention_pallas, scale=SCALE, config=config), *step)
    assert_kernels_alone(text, launches)
    for out, operand in ((0, 7), (1, 8)):
        assert f'output_tuple_indices = [{out}], operand_index = {operand},' in text
