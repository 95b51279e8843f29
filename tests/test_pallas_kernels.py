"""The Pallas GPU kernels against the XLA references, in interpret mode on the CPU.

Every case draws fresh random inputs: random non-contiguous block tables, ragged lengths (0, ends
mid-page, whole pages, several tiles), several block sizes and GQA ratios. The pools the kernel
reads hold NaN at every slot no sequence owns (page tails past a row's length, pages behind the
table's padding entries), while the reference reads a clean copy: a kernel that reads a byte
outside a row's context fails. Interpret mode starts every output as NaN, so an output element
the kernel never writes fails too.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._dispatch import choose_impl
from pallas_kernels.paged_attention import pallas_gpu as decode_gpu
from pallas_kernels.paged_attention.api import paged_decode_attention
from pallas_kernels.prefill_attention import pallas_gpu as prefill_gpu
from pallas_kernels.prefill_attention.api import paged_prefill_attention

KV_HEADS, HEAD_DIM = 2, 32
SCALE = HEAD_DIM ** -0.5
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


class Pools:
    """Random pools behind random tables. ``clean`` has random values everywhere; ``poisoned``
    is the same with NaN in every slot outside the rows' contexts."""

    def __init__(self, rng, context_lens, block_size, dtype, spare_blocks=3):
        self.context_lens = np.asarray(context_lens, np.int32)
        max_blocks = max(1, -(-int(self.context_lens.max()) // block_size))
        num_blocks = 1 + len(context_lens) * max_blocks + spare_blocks
        shape = (KV_HEADS, num_blocks, block_size, HEAD_DIM)
        k, v = (rng.standard_normal(shape, np.float32) for _ in range(2))
        self.block_tables = rng.permutation(np.arange(1, num_blocks))[
            :len(context_lens) * max_blocks].reshape(len(context_lens), max_blocks).astype(np.int32)
        owned = np.zeros((num_blocks, block_size), bool)
        for row, n in zip(self.block_tables, self.context_lens):
            pos = np.arange(n)
            owned[row[pos // block_size], pos % block_size] = True
        self.dtype = dtype
        self.clean = (jnp.asarray(k, dtype), jnp.asarray(v, dtype))
        poison = np.where(owned[None, :, :, None], 0.0, np.nan).astype(np.float32)
        self.poisoned = (jnp.asarray(k + poison, dtype), jnp.asarray(v + poison, dtype))

    def tables(self):
        return jnp.asarray(self.block_tables), jnp.asarray(self.context_lens)


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def decode_case(seed, block_size, group, context_lens, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    pools = Pools(rng, context_lens, block_size, dtype)
    q = jnp.asarray(rng.standard_normal((len(context_lens), KV_HEADS * group, HEAD_DIM)), dtype)
    tables, lens = pools.tables()
    ref = paged_decode_attention(q, *pools.clean, tables, lens, SCALE, impl='reference')
    return pools, q, ref


def assert_matches(ours, ref, dtype, empty):
    """Close to the reference, no NaN, and exact zeros where ``empty`` (rows or tokens with
    nothing to attend to)."""
    ours = np.asarray(ours.astype(jnp.float32))
    assert not np.isnan(ours).any(), 'the kernel read a poisoned slot or left an output unwritten'
    assert relative_error(ours, ref.astype(jnp.float32)) < TOLERANCE[dtype]
    assert (ours[np.asarray(empty)] == 0).all(), 'rows with nothing to attend to must be zeros'


@pytest.mark.parametrize('block_size,group', [(16, 1), (32, 4), (32, 3), (64, 8)])
def test_decode_matches_reference(block_size, group):
    """Through the op's API with its default launch configuration."""
    lens = [1, block_size + 3, 0, 2 * block_size, 5 * block_size - 7]
    pools, q, ref = decode_case(block_size + group, block_size, group, lens)
    out = paged_decode_attention(q, *pools.poisoned, *pools.tables(), SCALE, impl='pallas_interpret')
    assert_matches(out, ref, jnp.float32, np.asarray(lens) == 0)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_decode_half_precision(dtype):
    lens = [70, 0, 33, 128]
    pools, q, ref = decode_case(7, 32, 4, lens, dtype)
    out = paged_decode_attention(q, *pools.poisoned, *pools.tables(), SCALE, impl='pallas_interpret')
    assert out.dtype == dtype
    assert_matches(out, ref, dtype, np.asarray(lens) == 0)


@pytest.mark.parametrize('num_splits,tile_tokens', [(3, 16), (8, 32)])
def test_decode_split_over_the_sequence(num_splits, tile_tokens):
    """Flash-decoding: more splits than some rows have tiles (empty splits), a zero-length row,
    and tiles smaller than a page."""
    lens = [200, 0, 17, 64]
    pools, q, ref = decode_case(num_splits, 64, 4, lens)
    config = decode_gpu.DecodeConfig(tile_tokens=tile_tokens, num_splits=num_splits)
    out = decode_gpu.paged_decode_attention_pallas(q, *pools.poisoned, *pools.tables(), SCALE,
                                                   config=config, interpret=True)
    assert_matches(out, ref, jnp.float32, np.asarray(lens) == 0)


def prefill_case(seed, block_size, group, context_lens, query_lens, tokens, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    pools = Pools(rng, context_lens, block_size, dtype)
    q = jnp.asarray(rng.standard_normal((len(context_lens), tokens, KV_HEADS * group, HEAD_DIM)),
                    dtype)
    qlens = jnp.asarray(query_lens, jnp.int32)
    ref = paged_prefill_attention(q, *pools.clean, *pools.tables(), qlens, SCALE, impl='reference')
    padding = np.arange(tokens)[None, :] >= np.asarray(query_lens)[:, None]
    return pools, q, qlens, ref, padding


@pytest.mark.parametrize('block_size,group', [(16, 1), (32, 3), (64, 8)])
def test_prefill_matches_reference(block_size, group):
    """A chunk after a prefix ending mid-page, a whole prompt, an empty row, a short chunk."""
    tokens = 19
    context_lens = [block_size + 5, 19, 0, 2 * block_size + 1]
    query_lens = [9, 19, 0, 4]
    pools, q, qlens, ref, padding = prefill_case(block_size * group, block_size, group,
                                                 context_lens, query_lens, tokens)
    out = paged_prefill_attention(q, *pools.poisoned, *pools.tables(), qlens, SCALE,
                                  impl='pallas_interpret')
    assert_matches(out, ref, jnp.float32, padding)


def test_prefill_many_query_blocks_and_tiles_bf16():
    """Small blocks and tiles: several query blocks per row, several KV tiles per block, blocks
    made only of padding."""
    tokens = 40
    pools, q, qlens, ref, padding = prefill_case(11, 16, 4, [100, 40, 23], [40, 40, 3], tokens,
                                                 jnp.bfloat16)
    config = prefill_gpu.PrefillConfig(block_rows=16, tile_tokens=16)
    out = prefill_gpu.paged_prefill_attention_pallas(q, *pools.poisoned, *pools.tables(), qlens,
                                                     SCALE, config=config, interpret=True)
    assert_matches(out, ref, jnp.bfloat16, padding)


def test_choose_num_splits_fills_the_device():
    config = decode_gpu.DecodeConfig(target_programs=264)
    assert decode_gpu.choose_num_splits(64, 8, max_tiles=32, config=config) == 1
    assert decode_gpu.choose_num_splits(1, 8, max_tiles=32, config=config) == 32
    assert decode_gpu.choose_num_splits(1, 8, max_tiles=4, config=config) == 4
    assert decode_gpu.choose_num_splits(8, 8, max_tiles=32, config=config) == 5


def test_dispatch_takes_the_reference_on_cpu_and_rejects_unknown_names(monkeypatch):
    monkeypatch.delenv('LMDEPLOY_JAX_KERNELS', raising=False)
    assert choose_impl(None, supported=True) == 'reference'
    assert choose_impl('pallas_interpret', supported=True) == 'pallas_interpret'
    with pytest.raises(ValueError, match='unknown'):
        choose_impl('cuda', supported=True)
    with pytest.raises(ValueError, match='does not support'):
        choose_impl('pallas', supported=False)
