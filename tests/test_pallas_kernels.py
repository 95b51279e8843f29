"""The Pallas GPU kernels against the XLA references, in interpret mode on the CPU; with
``LMDEPLOY_JAX_KERNELS=pallas`` compiled and run on the GPU instead (``benchmark/check_kernels_gpu.sh``).

Every case draws fresh random inputs: random non-contiguous block tables, ragged lengths (0, ends
mid-page, whole pages, several tiles), several block sizes and GQA ratios. The pools the kernel
reads hold NaN at every slot no sequence owns (page tails past a row's length, pages behind the
table's padding entries), while the reference reads a clean copy: a kernel that reads a byte
outside a row's context fails. Interpret mode starts every output as NaN, so an output element
the kernel never writes fails too.

The KV write must leave the pools exactly as the reference's scatter does, every other layer and
slot included, except slot 0, where padding tokens race and any of their values may land.

The decode step (rope + KV write + attention in one kernel) reads pools whose new-token slots are
poisoned too (the kernel takes the new token from registers, never from the pool), inside a stack
whose other layers are NaN; it must leave every byte but the new tokens' slots as it was.

RMSNorm runs over hidden sizes that are not powers of two (the kernel masks its tile's tail) and
row counts that leave a program's last rows masked.
"""
from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._dispatch import choose_impl
from pallas_kernels.decode_step_attention import pallas_gpu as step_gpu
from pallas_kernels.decode_step_attention.api import decode_step_attention
from pallas_kernels.kv_write import pallas_gpu as write_gpu
from pallas_kernels.kv_write.api import write_kv
from pallas_kernels.paged_attention import mosaic_gpu as decode_mosaic
from pallas_kernels.paged_attention import pallas_gpu as decode_gpu
from pallas_kernels.paged_attention import triton_jax as decode_triton
from pallas_kernels.paged_attention.api import paged_decode_attention
from pallas_kernels.prefill_attention import pallas_gpu as prefill_gpu
from pallas_kernels.prefill_attention.api import paged_prefill_attention
from pallas_kernels.rms_norm import pallas_gpu as norm_gpu
from pallas_kernels.rms_norm.api import add_rms_norm, rms_norm
from pallas_kernels.rms_norm.reference import rms_norm_reference

# The kernels as the tests run them: interpreted on the CPU, or compiled for the GPU when asked.
ON_GPU = os.environ.get('LMDEPLOY_JAX_KERNELS') == 'pallas'
KERNEL, INTERPRET = ('pallas', False) if ON_GPU else ('pallas_interpret', True)
KV_HEADS, HEAD_DIM = 2, 32
SCALE = HEAD_DIM ** -0.5
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


class Pools:
    """Random pools behind random tables. ``clean`` has random values everywhere; ``poisoned``
    is the same with NaN in every slot outside the rows' cached positions: their contexts, or
    only the first ``cached_lens`` positions of them (a decode step's token is not cached yet),
    and none before ``starts`` (the first position a sliding window lets any query see)."""

    def __init__(self, rng, context_lens, block_size, dtype, spare_blocks=3, cached_lens=None, head_dim=HEAD_DIM,
                 starts=None):
        self.context_lens = np.asarray(context_lens, np.int32)
        self.block_size = block_size
        max_blocks = max(1, -(-int(self.context_lens.max()) // block_size))
        num_blocks = 1 + len(context_lens) * max_blocks + spare_blocks
        shape = (KV_HEADS, num_blocks, block_size, head_dim)
        k, v = (rng.standard_normal(shape, np.float32) for _ in range(2))
        self.block_tables = rng.permutation(np.arange(1, num_blocks))[
            :len(context_lens) * max_blocks].reshape(len(context_lens), max_blocks).astype(np.int32)
        owned = np.zeros((num_blocks, block_size), bool)
        ends = self.context_lens if cached_lens is None else cached_lens
        for row, n, first in zip(self.block_tables, ends, np.zeros_like(ends) if starts is None else starts):
            pos = np.arange(first, n)
            owned[row[pos // block_size], pos % block_size] = True
        self.dtype = dtype
        self.clean = (jnp.asarray(k, dtype), jnp.asarray(v, dtype))
        poison = np.where(owned[None, :, :, None], 0.0, np.nan).astype(np.float32)
        self.poisoned = (jnp.asarray(k + poison, dtype), jnp.asarray(v + poison, dtype))

    def tables(self):
        return jnp.asarray(self.block_tables), jnp.asarray(self.context_lens)

    def last_slots(self):
        """Each row's slot of position context_len - 1 (a decode step's token); 0 for empty rows."""
        pos = np.maximum(self.context_lens - 1, 0)
        page = self.block_tables[np.arange(len(pos)), pos // self.block_size]
        return jnp.asarray(np.where(self.context_lens > 0, page * self.block_size + pos % self.block_size, 0),
                           jnp.int32)

    def stacked(self, layer: int, layers: int, clean: bool = False):
        """The (poisoned, unless ``clean``) pools as layer ``layer`` of a ``[layers, ...]`` stack
        whose other layers are all NaN: a kernel that reads another layer fails."""
        def stack(pool):
            return jnp.stack([pool if i == layer else jnp.full_like(pool, jnp.nan) for i in range(layers)])
        return tuple(stack(pool) for pool in (self.clean if clean else self.poisoned))


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def window_starts(first_query_pos, options):
    """Each row's first position its first query sees under ``options``' sliding window (None
    without one): the pools are poisoned before it."""
    window = options.get('sliding_window')
    return None if window is None else np.maximum(np.asarray(first_query_pos) - window + 1, 0)


def decode_case(seed, block_size, group, context_lens, dtype=jnp.float32, head_dim=HEAD_DIM, **options):
    """``seed``: an int or a Generator; ``options``: the ops' ``sliding_window``/``logits_soft_cap``."""
    rng = np.random.default_rng(seed)
    pools = Pools(rng, context_lens, block_size, dtype, head_dim=head_dim,
                  starts=window_starts(np.asarray(context_lens) - 1, options))
    q = jnp.asarray(rng.standard_normal((len(context_lens), KV_HEADS * group, head_dim)), dtype)
    tables, lens = pools.tables()
    ref = paged_decode_attention(q, *pools.clean, tables, lens, SCALE, impl='reference', **options)
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
    out = paged_decode_attention(q, *pools.poisoned, *pools.tables(), SCALE, impl=KERNEL)
    assert_matches(out, ref, jnp.float32, np.asarray(lens) == 0)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_decode_half_precision(dtype):
    lens = [70, 0, 33, 128]
    pools, q, ref = decode_case(7, 32, 4, lens, dtype)
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


# (block_size, tile_tokens, dtype, num_splits): tiles of a quarter page (f32 halves tile_tokens), of a
# whole page, and over two pages (page_tiles falls back to per-position addressing).
PAGE_TILE_CASES = [(64, 32, jnp.float32, 3), (32, 32, jnp.bfloat16, 2), (16, 64, jnp.float32, 4)]


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


def prefill_case(seed, block_size, group, context_lens, query_lens, tokens, dtype=jnp.float32, head_dim=HEAD_DIM,
                 **options):
    """As ``decode_case``; the query tokens of row ``b`` are the last ``query_lens[b]`` of its context."""
    rng = np.random.default_rng(seed)
    pools = Pools(rng, context_lens, block_size, dtype, head_dim=head_dim,
                  starts=window_starts(np.asarray(context_lens) - np.asarray(query_lens), options))
    q = jnp.asarray(rng.standard_normal((len(context_lens), tokens, KV_HEADS * group, head_dim)),
                    dtype)
    qlens = jnp.asarray(query_lens, jnp.int32)
    ref = paged_prefill_attention(q, *pools.clean, *pools.tables(), qlens, SCALE, impl='reference', **options)
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
                                  impl=KERNEL)
    assert_matches(out, ref, jnp.float32, padding)


def test_prefill_many_query_blocks_and_tiles_bf16():
    """Small blocks and tiles: several query blocks per row, several KV tiles per block, blocks
    made only of padding."""
    tokens = 40
    pools, q, qlens, ref, padding = prefill_case(11, 16, 4, [100, 40, 23], [40, 40, 3], tokens,
                                                 jnp.bfloat16)
    config = prefill_gpu.PrefillConfig(block_rows=16, tile_tokens=16)
    out = prefill_gpu.paged_prefill_attention_pallas(q, *pools.stacked(0, 1), jnp.int32(0), *pools.tables(), qlens,
                                                     SCALE, config=config, interpret=INTERPRET)
    assert_matches(out, ref, jnp.bfloat16, padding)


@pytest.mark.parametrize('impl', [KERNEL, 'reference'])
def test_layer_stacked_pools_read_only_their_layer(impl):
    """The engine's pools stack every layer; each op reads only the layer it is given (an int32
    scalar, traced inside the model's scan over layers). The reference reads clean pools (it
    gathers whole pages, poisoned slots included, and masks after)."""
    lens = [40, 0, 17]
    pools, q, ref = decode_case(7, 16, 2, lens)
    layer, clean = jnp.int32(2), impl == 'reference'
    out = paged_decode_attention(q, *pools.stacked(2, 4, clean), *pools.tables(), SCALE, layer, impl=impl)
    assert_matches(out, ref, jnp.float32, empty=np.asarray(lens) == 0)
    qlens = jnp.asarray([5, 0, 17], jnp.int32)
    qp = jnp.asarray(np.random.default_rng(8).standard_normal((3, 17, KV_HEADS * 2, HEAD_DIM)), jnp.float32)
    ref = paged_prefill_attention(qp, *pools.clean, *pools.tables(), qlens, SCALE, impl='reference')
    out = paged_prefill_attention(qp, *pools.stacked(2, 4, clean), *pools.tables(), qlens, SCALE, layer,
                                  impl=impl)
    assert_matches(out, ref, jnp.float32, empty=np.arange(17)[None, :] >= np.asarray(qlens)[:, None])


def kv_write_case(rng, block_size, kv_heads, dtype, n, layers=None, padding=3, num_blocks=6):
    """Random pools (``layers`` None: one layer's), ``n`` new tokens at distinct random slots
    outside block 0, of which ``padding`` (at random positions) are padding tokens at slot 0."""
    shape = (kv_heads, num_blocks, block_size, HEAD_DIM)
    shape = shape if layers is None else (layers, *shape)
    k_pages, v_pages = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(2))
    k_new, v_new = (jnp.asarray(rng.standard_normal((n, kv_heads, HEAD_DIM), np.float32), dtype)
                    for _ in range(2))
    slots = rng.choice(np.arange(block_size, num_blocks * block_size), n, replace=False).astype(np.int32)
    pad = rng.choice(n, min(padding, n), replace=False)
    slots[pad] = 0
    return k_pages, v_pages, k_new, v_new, jnp.asarray(slots), pad


def assert_written(out, ref, new, pad, layer):
    """``out`` equals the reference's pools exactly, except at slot 0 of the written layer, where
    padding tokens race: each element there must come from one of them."""
    out, ref, new = (np.array(x.astype(jnp.float32)) for x in (out, ref, new))
    if out.ndim == 4:
        out, ref = out[None], ref[None]
    head_rows = out[layer, :, 0, 0].copy()                        # [kv_heads, head_dim]
    out[layer, :, 0, 0] = ref[layer, :, 0, 0] = 0
    np.testing.assert_array_equal(out, ref)
    if len(pad):
        assert (head_rows[None] == new[pad]).any(axis=0).all(), 'slot 0 holds no padding token\'s value'


@pytest.mark.parametrize('layers', [None, 3])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('block_size,kv_heads', [(16, 1), (32, 2), (64, 3), (16, 3)])
def test_kv_write_matches_reference(rng, block_size, kv_heads, dtype, layers):
    """Single-layer pools, or layer 1 of a stack of 3 (the others must stay exactly as they were),
    under jit with the layer traced; N not a multiple of the kernel's token block."""
    n = 2 * block_size + 5
    k_pages, v_pages, k_new, v_new, slots, pad = kv_write_case(rng, block_size, kv_heads, dtype, n, layers)
    layer = None if layers is None else jnp.int32(1)
    ref = write_kv(k_pages, v_pages, k_new, v_new, slots, layer, impl='reference')
    out = jax.jit(functools.partial(write_kv, impl=KERNEL))(k_pages, v_pages, k_new, v_new,
                                                                       slots, layer)
    for o, r, new in zip(out, ref, (k_new, v_new)):
        assert o.shape == r.shape and o.dtype == dtype
        assert_written(o, r, new, pad, 0 if layers is None else 1)


def test_kv_write_one_token_and_small_token_blocks(rng):
    """N = 1 (the block shrinks to one token) into the pools' very last slot; then blocks of 4
    tokens over 13 (several programs per head, a ragged last one)."""
    k_pages, v_pages, k_new, v_new, _, _ = kv_write_case(rng, 16, 2, jnp.bfloat16, 1, padding=0)
    last = jnp.asarray([k_pages.shape[1] * 16 - 1], jnp.int32)
    ref = write_kv(k_pages, v_pages, k_new, v_new, last, impl='reference')
    out = write_kv(k_pages, v_pages, k_new, v_new, last, impl=KERNEL)
    for o, r, new in zip(out, ref, (k_new, v_new)):
        assert_written(o, r, new, [], 0)
    k_pages, v_pages, k_new, v_new, slots, pad = kv_write_case(rng, 16, 3, jnp.float32, 13, layers=2)
    ref = write_kv(k_pages, v_pages, k_new, v_new, slots, 0, impl='reference')
    out = write_gpu.write_kv_pallas(k_pages, v_pages, k_new, v_new, slots, jnp.int32(0),
                                    config=write_gpu.WriteConfig(block_tokens=4), interpret=INTERPRET)
    for o, r, new in zip(out, ref, (k_new, v_new)):
        assert_written(o, r, new, pad, 0)


def test_kv_write_in_a_scan_over_layers(rng):
    """As the model calls it: the pools carried through a ``lax.scan`` whose index is the layer,
    each layer writing its own K/V to the same slots."""
    layers, n = 4, 21
    k_pages, v_pages, _, _, slots, pad = kv_write_case(rng, 32, 2, jnp.bfloat16, n, layers)
    k_new, v_new = (jnp.asarray(rng.standard_normal((layers, n, 2, HEAD_DIM)), jnp.bfloat16) for _ in range(2))

    def run(impl):
        def step(pools, xs):
            k, v, layer = xs
            return write_kv(*pools, k, v, slots, layer, impl=impl), None
        return jax.jit(lambda pools: jax.lax.scan(step, pools, (k_new, v_new, jnp.arange(layers, dtype=jnp.int32)))[0])(
            (k_pages, v_pages))

    out, ref = run(KERNEL), run('reference')
    for o, r, new in zip(out, ref, (k_new, v_new)):
        for layer in range(layers):
            assert_written(o[layer], r[layer], new[layer], pad, 0)


def test_kv_write_aliases_the_pools_in_the_gpu_lowering():
    """The in-place contract, checked without a GPU: lowered for CUDA, the kernel's call aliases
    the pool operands to its outputs, and a jit that donates the pools reuses their buffers."""
    pools = jax.ShapeDtypeStruct((2, 2, 4, 16, HEAD_DIM), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((5, 2, HEAD_DIM), jnp.bfloat16)
    f = jax.jit(functools.partial(write_kv, impl='pallas'), donate_argnums=(0, 1))
    try:
        text = f.trace(pools, pools, new, new, jax.ShapeDtypeStruct((5,), jnp.int32),
                       jax.ShapeDtypeStruct((), jnp.int32)).lower(lowering_platforms=('cuda',)).as_text()
    except Exception as e:      # noqa: BLE001 - a jaxlib that cannot lower for CUDA here
        pytest.skip(f'cannot lower for CUDA on this machine: {type(e).__name__}: {e}')
    assert text.count('stablehlo.custom_call') == 1
    for out, operand in ((0, 4), (1, 5)):
        assert (f'output_tuple_indices = [{out}], operand_index = {operand},') in text
        assert f'tf.aliasing_output = {out}' in text


def test_kv_write_supports_power_of_two_head_dims():
    pages = jnp.zeros((1, 2, 4, 16, 48), jnp.float32)
    assert not write_gpu.supports(jnp.zeros((3, 2, 48), jnp.float32), pages)
    assert write_gpu.supports(jnp.zeros((3, 2, 64), jnp.bfloat16), jnp.zeros((1, 2, 4, 16, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match='does not support'):
        write_kv(pages[0], pages[0], jnp.zeros((3, 2, 48)), jnp.zeros((3, 2, 48)), jnp.zeros((3,), jnp.int32),
                 impl=KERNEL)


# ---- the decode step: rope, KV write and attention in one kernel ----------------------------

STEP_LAYER, STEP_LAYERS = 1, 3


def rope_tables(rng, batch, head_dim=HEAD_DIM):
    """float32 cos/sin ``[batch, head_dim]`` of random angles, halves repeated (HF layout)."""
    angles = rng.uniform(-np.pi, np.pi, (batch, head_dim // 2)).astype(np.float32)
    angles = np.concatenate([angles, angles], axis=-1)
    return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def decode_step_case(seed, block_size, group, context_lens, dtype, head_dim=HEAD_DIM, **options):
    """Pools cached up to each row's new token (its slot poisoned, and every position before the
    row's sliding window), as layer ``STEP_LAYER`` of a NaN stack; the step's inputs ``(qkv, cos,
    sin)`` and the rest ``(layer, slots, tables, lens, scale)``; the reference's output over clean
    pools, and its pools written from the poisoned ones (what the kernel must leave). At most one
    empty row, so no two rows race for slot 0. ``seed`` and ``options`` as ``decode_case``."""
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
    (16, 8, jnp.bfloat16, None), (32, 1, jnp.float16, None)])
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
        config = decode_gpu.DecodeConfig(tile_tokens=16, num_splits=num_splits)
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
    config = decode_gpu.DecodeConfig(tile_tokens=tile_tokens, num_splits=num_splits, page_tiles=True)
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

    def run(impl):
        def step(kv, xs):
            x, layer, window = xs
            out, *kv = decode_step_attention(x, cos, sin, *kv, layer, pools.last_slots(), *pools.tables(), SCALE,
                                             sliding_window=window, impl=impl)
            return tuple(kv), out
        layer_index = jnp.arange(layers, dtype=jnp.int32)
        return jax.jit(lambda kv: jax.lax.scan(step, kv, (qkv, layer_index, windows)))(stack)

    (k_out, v_out), out = run(KERNEL)
    (k_ref, v_ref), ref = run('reference')
    assert_matches(out, ref, jnp.bfloat16, np.broadcast_to(np.asarray(lens) == 0, out.shape[:2]))
    np.testing.assert_array_equal(np.asarray(v_out, np.float32), np.asarray(v_ref, np.float32))
    assert relative_error(np.asarray(k_out, np.float32), np.asarray(k_ref, np.float32)) < TOLERANCE[jnp.bfloat16]


# ---- sliding windows and soft-capped scores -------------------------------------------------

# (block_size, group, sliding_window, logits_soft_cap, dtype, head_dim, launch): a window over two
# pages whose tiles splits share, one inside a page through the op's API (its default launch), the
# query's own position alone, and Gemma's 256-wide heads. Rows: one position, empty, as long as
# the window, one longer, and several pages longer (the tiles before the window never visited:
# the pools hold NaN there).
WINDOW_DECODE_CASES = [(16, 4, 20, 1.0, jnp.float32, HEAD_DIM, decode_gpu.DecodeConfig(num_splits=3)),
                       (32, 3, 7, None, jnp.bfloat16, HEAD_DIM, None),
                       (16, 1, 1, 0.5, jnp.float16, HEAD_DIM, decode_gpu.DecodeConfig(tile_tokens=16, num_splits=2,
                                                                                      page_tiles=True)),
                       (16, 2, 40, 2.0, jnp.bfloat16, 256, decode_gpu.DecodeConfig(num_splits=1))]


def window_lens(block_size, window):
    return np.asarray([1, 0, window, window + 1, 4 * block_size + 5], np.int32)


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


@pytest.mark.parametrize('block_size,group,window,soft_cap,dtype,head_dim,config', [
    (16, 4, 20, 1.0, jnp.float32, HEAD_DIM, decode_gpu.DecodeConfig(tile_tokens=16, num_splits=3, page_tiles=True)),
    (32, 2, 33, 2.0, jnp.bfloat16, 256, None)])
def test_decode_step_window_and_soft_cap(rng, block_size, group, window, soft_cap, dtype, head_dim, config):
    """The new token (always inside its window) and the cached positions in the window; the rows
    as ``test_decode_window_and_soft_cap``'s."""
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


@pytest.mark.parametrize('block_size,group,window,soft_cap,dtype,head_dim,config', [
    (16, 4, 20, 1.0, jnp.float32, HEAD_DIM, prefill_gpu.PrefillConfig(block_rows=16, tile_tokens=16)),
    (32, 1, 7, None, jnp.bfloat16, HEAD_DIM, None),
    (16, 2, 24, 2.0, jnp.bfloat16, 256, None)])
def test_prefill_window_and_soft_cap(rng, block_size, group, window, soft_cap, dtype, head_dim, config):
    """A chunk after a prefix longer than the window, a whole prompt, an empty row, and a whole
    prompt longer than the window over several query blocks (each block's first token's window
    starts its walk; later tokens mask more)."""
    context_lens = [3 * block_size + 5, 19, 0, 2 * block_size + 1]
    query_lens = [9, 19, 0, 2 * block_size + 1]
    options = dict(sliding_window=window, logits_soft_cap=soft_cap)
    pools, q, qlens, ref, padding = prefill_case(rng, block_size, group, context_lens, query_lens, max(query_lens),
                                                 dtype, head_dim, **options)
    if config is None:
        out = paged_prefill_attention(q, *pools.poisoned, *pools.tables(), qlens, SCALE, impl=KERNEL,
                                      **options)
    else:
        out = prefill_gpu.paged_prefill_attention_pallas(q, *pools.stacked(0, 1), jnp.int32(0), *pools.tables(),
                                                         qlens, SCALE, jnp.int32(window), soft_cap, config=config,
                                                         interpret=INTERPRET)
    assert_matches(out, ref, dtype, padding)


def xla_combine(o, m, l):
    """The split combine as the XLA formula the Pallas kernel replaced (four kernels on a GPU)."""
    m_max = m.max(axis=1, keepdims=True)
    w = jnp.exp2(m - jnp.where(jnp.isfinite(m_max), m_max, 0.0))
    total = (w * l).sum(axis=1)
    return (w[..., None] * o).sum(axis=1) / jnp.where(total > 0, total, 1.0)[..., None]


@pytest.mark.parametrize('num_splits,dtype', [(2, jnp.float32), (3, jnp.bfloat16), (8, jnp.float32)])
def test_combine_splits_matches_the_xla_formula(rng, num_splits, dtype):
    """Random partials with empty splits (max -inf, sum 0) scattered about, and one row whose
    splits are all empty (zeros out)."""
    batch, heads = 3, 5
    o = rng.standard_normal((batch, num_splits, heads, HEAD_DIM)).astype(np.float32)
    m = (4 * rng.standard_normal((batch, num_splits, heads))).astype(np.float32)
    l = rng.uniform(0.5, 3.0, (batch, num_splits, heads)).astype(np.float32)
    empty = rng.random(m.shape) < 0.3
    empty[1] = True
    m[empty], l[empty], o[empty] = -np.inf, 0.0, 0.0
    out = decode_gpu.combine_splits(*map(jnp.asarray, (o, m, l)), dtype, interpret=INTERPRET)
    assert out.dtype == dtype
    assert_matches(out, xla_combine(o, m, l), dtype, empty=np.arange(batch) == 1)


def test_decode_ops_lower_to_their_kernels_alone():
    """Lowered for CUDA (Triton IR, checked without a GPU): around the kernels only free
    reshapes, nothing XLA must launch (the layer's pool row is computed in the kernels); the
    decode step is two launches (the step and the split combine), or one with one split, and it
    aliases the pools to its outputs; ``page_tiles`` (16-position tiles of 16-position pages)
    lowers too."""
    shape = jax.ShapeDtypeStruct
    pools = shape((4, KV_HEADS, 8, 16, HEAD_DIM), jnp.bfloat16)
    step = (shape((1, 6 * KV_HEADS * HEAD_DIM), jnp.bfloat16), shape((1, HEAD_DIM), jnp.float32),
             shape((1, HEAD_DIM), jnp.float32), pools, pools, shape((), jnp.int32), shape((1,), jnp.int32),
             shape((1, 64), jnp.int32), shape((1,), jnp.int32))

    def lower(fn, *args):
        try:
            return jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text()
        except Exception as e:      # noqa: BLE001 - a jaxlib that cannot lower for CUDA here
            pytest.skip(f'cannot lower for CUDA on this machine: {type(e).__name__}: {e}')

    for config, launches in ((decode_gpu.DecodeConfig(), 2), (decode_gpu.DecodeConfig(num_splits=1), 1),
                             (decode_gpu.DecodeConfig(tile_tokens=16, page_tiles=True), 2)):
        text = lower(functools.partial(step_gpu.decode_step_attention_pallas, scale=SCALE, config=config), *step)
        assert set(re.findall(r'= (stablehlo\.\w+)', text)) == {'stablehlo.custom_call', 'stablehlo.reshape'}
        assert text.count('stablehlo.custom_call') == launches
        for out, operand in ((0, 7), (1, 8)):
            assert f'output_tuple_indices = [{out}], operand_index = {operand},' in text
    q = shape((1, 4 * KV_HEADS, HEAD_DIM), jnp.bfloat16)
    text = lower(lambda q, k, v, t, n, layer: paged_decode_attention(q, k, v, t, n, SCALE, layer, impl='pallas'),
                 q, pools, pools, *step[7:], step[5])
    assert set(re.findall(r'= (stablehlo\.\w+)', text)) == {'stablehlo.custom_call', 'stablehlo.reshape'}


# ---- decode alternatives: Mosaic GPU (interpreter + CUDA lowering) and Triton (sm_90 compile) ----------------

def mosaic_interpreter():
    """JAX's Mosaic GPU interpreter (private; 0.10) with its race detector, or a skip."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:
        pytest.skip(f'no Mosaic GPU interpreter in this JAX: {e}')
    return InterpretGPUParams(detect_races=True), interpret_pallas_call


@pytest.mark.parametrize('block_size,group,num_splits,dtype', [
    (16, 4, None, jnp.bfloat16), (32, 3, 3, jnp.float16), (64, 4, 1, jnp.bfloat16), (128, 8, 2, jnp.bfloat16)])
def test_mosaic_decode_matches_reference(rng, block_size, group, num_splits, dtype):
    """The Mosaic GPU kernel in JAX's Mosaic GPU interpreter (TMA copies, barriers and shared memory
    simulated, races detected; the two wgmmas there are jnp.dots of the same tiles): layer 1 of a
    poisoned stack; rows of length 0, mid-page, whole pages, 40 positions of 16-position pages (a
    64-row step past the table's end); splits with no steps."""
    params, interpreter = (False, None) if ON_GPU else mosaic_interpreter()
    lens = [1, 0, block_size + 3, 2 * block_size, 40 if block_size == 16 else 5 * block_size - 7]
    pools = Pools(rng, lens, block_size, dtype, head_dim=128)
    q = jnp.asarray(rng.standard_normal((len(lens), KV_HEADS * group, 128)), dtype)
    ref = paged_decode_attention(q, *pools.clean, *pools.tables(), SCALE, impl='reference')
    config = decode_mosaic.MosaicConfig(num_splits=num_splits, stages=2)
    assert decode_mosaic.supports(q, pools.stacked(1, 2)[0])
    out = decode_mosaic.paged_decode_attention_mosaic(q, *pools.stacked(1, 2), jnp.int32(1), *pools.tables(), SCALE,
                                                      config=config, interpret=params)
    assert interpreter is None or not interpreter.get_races().races_found
    assert out.dtype == dtype
    assert_matches(out, ref, dtype, np.asarray(lens) == 0)


def lower_for_cuda(fn, *args):
    try:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text()
    except Exception as e:      # noqa: BLE001 - a jaxlib that cannot lower for CUDA here
        if 'cuda' in str(e).lower() and 'platform' in str(e).lower():
            pytest.skip(f'cannot lower for CUDA on this machine: {type(e).__name__}: {e}')
        raise


@pytest.mark.parametrize('semantics', [None, 'warpgroup'])
@pytest.mark.parametrize('batch,block_size,num_splits,launches', [(64, 64, None, 1), (1, 64, None, 2), (3, 16, 1, 1),
                                                                  (2, 128, 4, 2)])
def test_mosaic_decode_lowers_for_cuda(batch, block_size, num_splits, launches, semantics):
    """Lowered for CUDA without a GPU, Mosaic GPU checks what the interpreter does not: wgmma operand
    shapes and layouts, tiling of every copy, the shared-memory budget. Llama3-8b heads, bf16;
    batch 1 splits the sequence (the kernel, then ``combine_splits``), batch 64 does not. Warpgroup
    semantics run Mosaic GPU's constraint-based layout and transform inference (which found a query
    copy from any row into the swizzled tiles unsatisfiable: the failure on JAX 0.11)."""
    shape = jax.ShapeDtypeStruct
    pools = shape((2, 8, 4 * batch * 2048 // block_size, block_size, 128), jnp.bfloat16)
    args = (shape((batch, 32, 128), jnp.bfloat16), pools, pools, shape((), jnp.int32),
            shape((batch, 2048 // block_size), jnp.int32), shape((batch,), jnp.int32))
    config = decode_mosaic.MosaicConfig(num_splits=num_splits, semantics=semantics)
    text = lower_for_cuda(functools.partial(decode_mosaic.paged_decode_attention_mosaic, scale=SCALE, config=config),
                          *args)
    assert text.count('@mosaic_gpu') == 1
    assert text.count('stablehlo.custom_call') == launches


@pytest.mark.parametrize('dtype,block_size,group,num_splits,tile_tokens', [
    (jnp.bfloat16, 64, 4, 1, 64), (jnp.bfloat16, 64, 4, 8, 64), (jnp.bfloat16, 16, 3, 1, 64),
    (jnp.float32, 128, 1, 2, 64), (jnp.float16, 32, 8, 1, 128)])
def test_triton_decode_compiles_for_sm90(dtype, block_size, group, num_splits, tile_tokens):
    """The jax_triton kernel through Triton's whole pipeline to an sm_90 cubin, without a GPU
    (triton comes with the test extra; jax_triton itself needs a CUDA jaxlib, so the call is
    checked on the GPU by ``bench_kernels.py --impls jax_triton``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    q = jax.ShapeDtypeStruct((4, 8 * group, 128), dtype)
    pools = jax.ShapeDtypeStruct((2, 8, 100, block_size, 128), dtype)
    tables = jax.ShapeDtypeStruct((4, 2048 // block_size), jnp.int32)
    config = decode_triton.TritonConfig(tile_tokens=tile_tokens, num_splits=num_splits)
    consts = decode_triton.kernel_constants(q, pools, tables, SCALE, config)
    types = {jnp.bfloat16: 'bf16', jnp.float16: 'fp16', jnp.float32: 'fp32'}
    out = types[dtype] if num_splits == 1 else 'fp32'
    signature = dict(layer_ptr='*i32', lens_ptr='*i32', tables_ptr='*i32', q_ptr=f'*{types[dtype]}',
                     k_ptr=f'*{types[dtype]}', v_ptr=f'*{types[dtype]}', o_ptr=f'*{out}', m_ptr='*fp32', l_ptr='*fp32',
                     **dict.fromkeys(consts, 'constexpr'))
    source = triton.compiler.ASTSource(decode_triton.triton_kernel(), signature, constexprs=consts)
    compiled = triton.compile(source, target=GPUTarget('cuda', 90, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    assert consts['NUM_SPLITS'] == num_splits
    assert compiled.asm['cubin'] and '.target sm_90' in compiled.asm['ptx']


def compile_for_sm90(monkeypatch, tmp_path, fn, *args) -> tuple[str, dict[str, int]]:
    """``fn``'s Pallas (Triton) kernels lowered for CUDA, then each compiled by Triton to an sm_90
    cubin, without a GPU (JAX's Triton IR taken from its private lowering, as the GPU plugin
    would compile it): the lowered text, and each kernel's shared memory in bytes."""
    triton = pytest.importorskip('triton')
    from triton.backends.compiler import GPUTarget
    lowering = pytest.importorskip('jax._src.pallas.triton.lowering')
    modules, lower = {}, lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = lower(*a, **k)
        text = result.module.operation.get_asm(enable_debug_info=False)
        modules[re.search(r'tt\.func public @(\w+)', text).group(1)] = text
        return result

    monkeypatch.setattr(lowering, 'lower_jaxpr_to_triton_module', capture)
    text = lower_for_cuda(fn, *args)
    if '__gpu$xla.gpu.triton' not in text:
        pytest.skip('this jaxlib compiles its Triton kernels while lowering: the test reads the Triton IR it passes on')
    shared = {}
    for name, stages, warps in re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text):
        path = tmp_path / f'{name}.ttir'
        path.write_text(modules[name])
        compiled = triton.compile(str(path), target=GPUTarget('cuda', 90, 32),
                                  options=dict(num_warps=int(warps), num_stages=int(stages)))
        shared[name] = compiled.metadata.shared
    return text, shared


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_windowed_soft_capped_kernels_fit_sm90_at_head_dim_256(monkeypatch, tmp_path, dtype):
    """Gemma's 256-wide heads, a traced sliding window and a soft cap, through each op's API at
    its default launch: every kernel compiles for sm_90 within sm_90's shared memory per block,
    and the window adds no XLA op around the kernels (it is passed by a free reshape)."""
    shape, hd = jax.ShapeDtypeStruct, 256
    pools, layer, window = shape((2, 8, 256, 64, hd), dtype), shape((), jnp.int32), shape((), jnp.int32)
    tables, lens = shape((4, 64), jnp.int32), shape((4,), jnp.int32)
    options = dict(logits_soft_cap=50.0, impl='pallas')
    cases = [
        (lambda q, k, v, l, t, n, w: paged_decode_attention(q, k, v, t, n, SCALE, l, sliding_window=w, **options),
         (shape((4, 16, hd), dtype), pools, pools, layer, tables, lens, window)),
        (lambda x, c, s_, k, v, l, sl, t, n, w: decode_step_attention(x, c, s_, k, v, l, sl, t, n, SCALE,
                                                                     sliding_window=w, **options),
         (shape((4, 32 * hd), dtype), shape((4, hd), jnp.float32), shape((4, hd), jnp.float32), pools, pools, layer,
          lens, tables, lens, window)),
        (lambda q, k, v, l, t, n, m, w: paged_prefill_attention(q, k, v, t, n, m, SCALE, l, sliding_window=w,
                                                                **options),
         (shape((4, 128, 16, hd), dtype), pools, pools, layer, tables, lens, lens, window))]
    for fn, args in cases:
        text, shared = compile_for_sm90(monkeypatch, tmp_path, fn, *args)
        assert set(re.findall(r'= (stablehlo\.\w+)', text)) == {'stablehlo.custom_call', 'stablehlo.reshape'}
        assert shared and max(shared.values()) <= decode_mosaic.SMEM_BYTES, shared


def test_attention_kernels_refuse_unsupported_heads_with_the_reason():
    """Head dims the kernels cannot take run on the reference under ``auto``; naming the kernel
    says why."""
    tables, lens = jnp.ones((3, 2), jnp.int32), jnp.ones((3,), jnp.int32)
    for head_dim in (96, 512, 8):
        pages = jnp.ones((2, 4, 16, head_dim), jnp.bfloat16)
        q = jnp.ones((3, 4, head_dim), jnp.bfloat16)
        with pytest.raises(ValueError, match=f'does not support.*heads of {head_dim} elements.*from 16 to 256'):
            paged_decode_attention(q, pages, pages, tables, lens, SCALE, impl=KERNEL)
        with pytest.raises(ValueError, match=f'heads of {head_dim} elements'):
            paged_prefill_attention(q[:, None], pages, pages, tables, lens, lens, SCALE, impl=KERNEL)
    assert paged_decode_attention(q, pages, pages, tables, lens, SCALE, impl='auto').shape == q.shape  # the reference
    pages = jnp.ones((1, 4, 16, 32), jnp.float32)
    with pytest.raises(ValueError, match='128 query heads per KV head: the prefill kernel takes at most 64'):
        paged_prefill_attention(jnp.ones((3, 1, 128, 32)), pages, pages, tables, lens, lens, SCALE,
                                impl=KERNEL)


def test_choose_num_splits_fills_the_device():
    config = decode_gpu.DecodeConfig(target_programs=264)
    assert decode_gpu.choose_num_splits(64, 8, max_tiles=32, config=config) == 1
    assert decode_gpu.choose_num_splits(1, 8, max_tiles=32, config=config) == 32
    assert decode_gpu.choose_num_splits(1, 8, max_tiles=4, config=config) == 4
    assert decode_gpu.choose_num_splits(8, 8, max_tiles=32, config=config) == 5


@pytest.mark.skipif(ON_GPU, reason='the CPU\'s dispatch')
def test_dispatch_takes_the_reference_on_cpu_and_rejects_unknown_names(monkeypatch):
    monkeypatch.delenv('LMDEPLOY_JAX_KERNELS', raising=False)
    assert choose_impl(None, supported=True) == 'reference'
    assert choose_impl('pallas_interpret', supported=True) == 'pallas_interpret'
    with pytest.raises(ValueError, match='unknown'):
        choose_impl('cuda', supported=True)
    with pytest.raises(ValueError, match='does not support'):
        choose_impl('pallas', supported=False)


# ---- RMSNorm --------------------------------------------------------------------------------

NORM_EPS = 1e-5


def norm_case(rng, shape, dtype, weight_dtype=None):
    """Random ``x`` whose rows have scales from 0.01 to 10 (eps matters for the small ones), and a
    random weight around 1 of ``weight_dtype`` (default: x's)."""
    scales = 10.0 ** rng.uniform(-2, 1, (*shape[:-1], 1))
    x = jnp.asarray(rng.standard_normal(shape) * scales, dtype)
    return x, jnp.asarray(1 + 0.5 * rng.standard_normal(shape[-1]), weight_dtype or dtype)


def assert_norm_matches(out, x, weight, dtype):
    """Close to the reference (interpret mode starts the output as NaN: an element the kernel
    never writes fails), with the reference's shape and dtype."""
    ref = rms_norm(x, weight, NORM_EPS, impl='reference')
    assert out.shape == ref.shape and out.dtype == ref.dtype == dtype
    ours = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(ours).any(), 'the kernel left an output element unwritten'
    assert relative_error(ours, ref.astype(jnp.float32)) < TOLERANCE[dtype]


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize('shape', [(1, 576), (3, 5, 96), (300, 576), (2, 100, 128), (7, 3584)])
def test_rms_norm_matches_reference(rng, shape, dtype):
    """Through the op's API with its default launch: hidden sizes that are not powers of two (96,
    576, 3584: a masked tile tail) and one that is; ``[N, hidden]`` and ``[B, T, hidden]``; one
    row (a batch-1 decode step) and hundreds (several rows per program, the last partly masked)."""
    x, weight = norm_case(rng, shape, dtype)
    assert_norm_matches(rms_norm(x, weight, NORM_EPS, impl=KERNEL), x, weight, dtype)


@pytest.mark.parametrize('tile_elems,num_warps', [(128, 2), (256, None), (8192, 8)])
def test_rms_norm_launch_configs(rng, tile_elems, num_warps):
    """Tiles smaller than one padded row (one row per program), of two rows, or of many; 37 rows
    leave the last program's rows partly past the end."""
    x, weight = norm_case(rng, (37, 96), jnp.bfloat16)
    config = norm_gpu.NormConfig(tile_elems=tile_elems, num_warps=num_warps)
    out = norm_gpu.rms_norm_pallas(x, weight[None], jnp.int32(0), NORM_EPS, config=config, interpret=INTERPRET)
    assert_norm_matches(out, x, weight, jnp.bfloat16)


@pytest.mark.parametrize('layer', [0, 2])
def test_rms_norm_reads_its_layer_of_stacked_weights(rng, layer):
    """Every layer's weights stacked ``[layers, hidden]`` plus the layer (as in the models' layer
    loop): the kernel scales by that layer's row, the first and one further in, not the first."""
    x, _ = norm_case(rng, (5, 96), jnp.bfloat16)
    stack = jnp.asarray(1 + 0.5 * rng.standard_normal((3, 96)), jnp.bfloat16)
    out = rms_norm(x, stack, NORM_EPS, jnp.int32(layer), impl=KERNEL)
    assert_norm_matches(out, x, stack[layer], jnp.bfloat16)
    assert relative_error(out.astype(jnp.float32), rms_norm(x, stack[layer - 1], NORM_EPS).astype(jnp.float32)) > 0.1


def test_rms_norm_promotes_like_the_reference(rng):
    """A float32 weight on bfloat16 ``x``: normalised in bfloat16, then scaled in float32."""
    x, weight = norm_case(rng, (4, 3, 160), jnp.bfloat16, jnp.float32)
    assert_norm_matches(rms_norm(x, weight, NORM_EPS, impl=KERNEL), x, weight, jnp.float32)


def test_rms_norm_supports_rows_up_to_max_hidden(monkeypatch):
    """Wider rows, float64 and empty inputs take the reference (an error if the kernel is named)."""
    monkeypatch.delenv('LMDEPLOY_JAX_KERNELS', raising=False)
    wide = jnp.ones((2, norm_gpu.MAX_HIDDEN * 2), jnp.float32)
    assert norm_gpu.supports(wide[:, :norm_gpu.MAX_HIDDEN], wide[0, :norm_gpu.MAX_HIDDEN])
    assert not norm_gpu.supports(wide, wide[0])
    assert not norm_gpu.supports(jnp.ones((0, 64), jnp.float32), jnp.ones((64,), jnp.float32))
    np.testing.assert_array_equal(rms_norm(wide, wide[0], NORM_EPS), rms_norm_reference(wide, wide[0], NORM_EPS))
    with pytest.raises(ValueError, match='does not support'):
        rms_norm(wide, wide[0], NORM_EPS, impl=KERNEL)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('shape', [(1, 1, 576), (37, 96), (2, 50, 128)])
def test_add_rms_norm_returns_the_sum_and_its_norm(rng, shape, dtype):
    """The residual add and the norm after it as one kernel: the sum exactly as ``x + residual``
    in ``x``'s dtype (the residual stream the next layer adds to), the norm as the reference's
    of that sum; one row (batch-1 decode) and many, stacked weights read at a layer."""
    x, _ = norm_case(rng, shape, dtype)
    residual, _ = norm_case(rng, shape, dtype)
    stack = jnp.asarray(1 + 0.5 * rng.standard_normal((3, shape[-1])), dtype)
    total, normed = add_rms_norm(x, residual, stack, NORM_EPS, jnp.int32(2), impl=KERNEL)
    want_total, want_normed = add_rms_norm(x, residual, stack, NORM_EPS, jnp.int32(2), impl='reference')
    assert total.dtype == dtype and total.shape == x.shape
    np.testing.assert_array_equal(np.asarray(total.astype(jnp.float32)), np.asarray((x + residual).astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(want_total), np.asarray(total))
    assert_norm_matches(normed, want_total, stack[2], dtype)
    assert relative_error(normed.astype(jnp.float32), want_normed.astype(jnp.float32)) < TOLERANCE[dtype]


def test_add_rms_norm_refuses_a_residual_unlike_x(rng):
    x, weight = norm_case(rng, (2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r'residual must match x bfloat16 \(2, 64\), got float32'):
        add_rms_norm(x, x.astype(jnp.float32), weight, NORM_EPS)


def test_rms_norm_lowers_to_its_kernel_alone():
    """A decode step's norm ``[B=1, T=1, 4096]`` and a prefill's of a hidden size that is not a
    power of two, each reading its layer of stacked weights as in the models' layer loop, lowered
    for CUDA (Triton IR, checked without a GPU): one launch and free reshapes, nothing XLA must
    launch (no slice of the weights)."""
    for shape in ((1, 1, 4096), (3, 17, 3584)):
        x, stack = jax.ShapeDtypeStruct(shape, jnp.bfloat16), jax.ShapeDtypeStruct((4, shape[-1]), jnp.bfloat16)
        layer = jax.ShapeDtypeStruct((), jnp.int32)
        try:
            text = jax.jit(lambda x, w, i: rms_norm(x, w, NORM_EPS, i, impl='pallas')).trace(x, stack, layer).lower(
                lowering_platforms=('cuda',)).as_text()
        except Exception as e:      # noqa: BLE001 - a jaxlib that cannot lower for CUDA here
            pytest.skip(f'cannot lower for CUDA on this machine: {type(e).__name__}: {e}')
        assert set(re.findall(r'= (stablehlo\.\w+)', text)) == {'stablehlo.custom_call', 'stablehlo.reshape'}
        assert text.count('stablehlo.custom_call') == 1
        text = jax.jit(lambda x, w, i: add_rms_norm(x, x, w, NORM_EPS, i, impl='pallas')).trace(x, stack, layer).lower(
            lowering_platforms=('cuda',)).as_text()
        assert set(re.findall(r'= (stablehlo\.\w+)', text)) == {'stablehlo.custom_call', 'stablehlo.reshape'}
        assert text.count('stablehlo.custom_call') == 1
