"""The paged decode attention kernel (``pallas_kernels/paged_attention/pallas_gpu.py``) against its
XLA reference: through the op's API and at forced launch configurations (flash-decoding splits,
``page_tiles``), sliding windows and soft-capped scores, stacked layers, the split combine, and its
CUDA lowering. The harness (interpret mode or the GPU, poisoned pools) is ``pallas_cases``."""
from __future__ import annotations

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
    assert_kernels_alone,
    assert_matches,
    decode_case,
    lower_for_cuda,
    window_lens,
)

from pallas_kernels.paged_attention import pallas_gpu as decode_gpu
from pallas_kernels.paged_attention.api import paged_decode_attention


@pytest.mark.parametrize('block_size,group,dtype', [(16, 1, jnp.float32), (32, 4, jnp.bfloat16),
                                                    (32, 3, jnp.float16), (64, 8, jnp.float32)])
def test_decode_matches_reference(block_size, group, dtype):
    """Through the op's API with its default launch configuration, in the kernel's three dtypes;
    the output keeps the query's dtype."""
    lens = [1, block_size + 3, 0, 2 * block_size, 5 * block_size - 7]
    pools, q, ref = decode_case(block_size + group, block_size, group, lens, dtype)
    out = paged_decode_attention(q, *pools.poisoned, *pools.tables(), SCALE, impl=KERNEL)
    assert out.dtype == dtype
    assert_matches(out, ref, dtype, np.asarray(lens) == 0)


@pytest.mark.parametrize('num_splits,tile_tokens', [(3, 16), (8, 32)])
def test_decode_split_over_the_sequence(num_splits, tile_tokens):
    """Flash-decoding: more splits than some rows have tiles (empty splits), a zero-length row,
    and tiles smaller than a page."""
    lens = [200, 0, 17, 64]
    pools, q, ref = decode_case(num_splits, 64, 4, lens)
    config = decode_gpu.DecodeConfig(tile_tokens=tile_tokens, num_splits=num_splits)
    out = decode_gpu.paged_decode_attention_pallas(q, *pools.stacked(0, 1), jnp.int32(0), *pools.tables(), SCALE,
                                                   config=config, interpret=INTERPRET)
    assert_matches(out, ref, jnp.float32, np.asarray(lens) == 0)


@pytest.mark.parametrize('block_size,tile_tokens,dtype,num_splits', PAGE_TILE_CASES)
def test_decode_page_tiles(block_size, tile_tokens, dtype, num_splits):
    """``page_tiles`` (one page number per tile): rows ending mid-tile, mid-page and at the
    table's end, an empty row, splits with no tiles; layer 1 of a poisoned stack."""
    lens = [3 * block_size, 1, block_size + 3, 0, 2 * block_size - 5]
    pools, q, ref = decode_case(block_size + num_splits, block_size, 2, lens, dtype)
    config = decode_gpu.DecodeConfig(tile_tokens=tile_tokens, num_splits=num_splits, page_tiles=True)
    out = decode_gpu.paged_decode_attention_pallas(q, *pools.stacked(1, 2), jnp.int32(1), *pools.tables(), SCALE,
                                                   config=config, interpret=INTERPRET)
    assert_matches(out, ref, dtype, np.asarray(lens) == 0)


@pytest.mark.parametrize('impl', [KERNEL, 'reference'])
def test_decode_reads_only_its_layer_of_stacked_pools(impl):
    """The engine's pools stack every layer; the op reads only the layer it is given (an int32
    scalar, traced inside the model's scan over layers). The reference reads clean pools (it
    gathers whole pages, poisoned slots included, and masks after)."""
    lens = [40, 0, 17]
    pools, q, ref = decode_case(7, 16, 2, lens)
    out = paged_decode_attention(q, *pools.stacked(2, 4, clean=impl == 'reference'), *pools.tables(), SCALE,
                                 jnp.int32(2), impl=impl)
    assert_matches(out, ref, jnp.float32, empty=np.asarray(lens) == 0)


# (block_size, group, sliding_window, logits_soft_cap, dtype, head_dim, launch): a window over two
# pages whose tiles splits share, one inside a page through the op's API (its default launch), the
# query's own position alone, and Gemma's 256-wide heads; the rows are ``window_lens``'.
WINDOW_DECODE_CASES = [(16, 4, 20, 1.0, jnp.float32, HEAD_DIM, decode_gpu.DecodeConfig(num_splits=3)),
                       (32, 3, 7, None, jnp.bfloat16, HEAD_DIM, None),
                       (16, 1, 1, 0.5, jnp.float16, HEAD_DIM, decode_gpu.DecodeConfig(tile_tokens=16, num_splits=2,
                                                                                      page_tiles=True)),
                       (16, 2, 40, 2.0, jnp.bfloat16, 256, decode_gpu.DecodeConfig(num_splits=1))]


@pytest.mark.parametrize('block_size,group,window,soft_cap,dtype,head_dim,config', WINDOW_DECODE_CASES)
def test_decode_window_and_soft_cap(rng, block_size, group, window, soft_cap, dtype, head_dim, config):
    lens = window_lens(block_size, window)
    options = dict(sliding_window=window, logits_soft_cap=soft_cap)
    pools, q, ref = decode_case(rng, block_size, group, lens, dtype, head_dim, **options)
    if config is None:
        out = paged_decode_attention(q, *pools.poisoned, *pools.tables(), SCALE, impl=KERNEL, **options)
    else:
        out = decode_gpu.paged_decode_attention_pallas(q, *pools.stacked(0, 1), jnp.int32(0), *pools.tables(), SCALE,
                                                       jnp.int32(window), soft_cap, config=config, interpret=INTERPRET)
    assert out.dtype == dtype
    assert_matches(out, ref, dtype, lens == 0)


def xla_combine(o, m, sums):
    """The split combine as the XLA formula the Pallas kernel replaced (four kernels on a GPU):
    the splits' outputs ``o``, score maxima ``m`` (log2) and exponential sums ``sums``."""
    m_max = m.max(axis=1, keepdims=True)
    w = jnp.exp2(m - jnp.where(jnp.isfinite(m_max), m_max, 0.0))
    total = (w * sums).sum(axis=1)
    return (w[..., None] * o).sum(axis=1) / jnp.where(total > 0, total, 1.0)[..., None]


@pytest.mark.parametrize('num_splits,dtype', [(2, jnp.float32), (3, jnp.bfloat16), (8, jnp.float32)])
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
    out = decode_gpu.combine_splits(*map(jnp.asarray, (o, m, sums)), dtype, interpret=INTERPRET)
    assert out.dtype == dtype
    assert_matches(out, xla_combine(o, m, sums), dtype, empty=np.arange(batch) == 1)


def test_choose_num_splits_fills_the_device():
    config = decode_gpu.DecodeConfig(target_programs=264)
    assert decode_gpu.choose_num_splits(64, 8, max_tiles=32, config=config) == 1
    assert decode_gpu.choose_num_splits(1, 8, max_tiles=32, config=config) == 32
    assert decode_gpu.choose_num_splits(1, 8, max_tiles=4, config=config) == 4
    assert decode_gpu.choose_num_splits(8, 8, max_tiles=32, config=config) == 5


def test_decode_lowers_to_its_kernels_alone():
    """Lowered for CUDA (Triton IR, checked without a GPU) at a traced layer of stacked pools:
    around the kernels only free reshapes, nothing XLA must launch (the layer's pool row is
    computed in the kernels)."""
    shape = jax.ShapeDtypeStruct
    pools = shape((4, KV_HEADS, 8, 16, HEAD_DIM), jnp.bfloat16)
    text = lower_for_cuda(lambda q, k, v, t, n, layer: paged_decode_attention(q, k, v, t, n, SCALE, layer,
                                                                              impl='pallas'),
                          shape((1, 4 * KV_HEADS, HEAD_DIM), jnp.bfloat16), pools, pools, shape((1, 64), jnp.int32),
                          shape((1,), jnp.int32), shape((), jnp.int32))
    assert_kernels_alone(text)
