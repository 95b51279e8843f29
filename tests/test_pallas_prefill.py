"""The paged prefill attention kernel (``pallas_kernels/prefill_attention/pallas_gpu.py``) against
its XLA reference: chunks after cached prefixes, whole prompts, empty rows, several query blocks
and KV tiles, stacked layers, sliding windows and soft-capped scores. The harness (interpret mode
or the GPU, poisoned pools) is ``pallas_cases``."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from pallas_cases import HEAD_DIM, INTERPRET, KERNEL, KV_HEADS, SCALE, Pools, assert_matches, window_starts

from pallas_kernels.prefill_attention import pallas_gpu as prefill_gpu
from pallas_kernels.prefill_attention.api import paged_prefill_attention


def prefill_case(seed, block_size, group, context_lens, query_lens, tokens, dtype=jnp.float32, head_dim=HEAD_DIM,
                 **options):
    """Pools, queries ``[B, tokens, KV_HEADS * group, head_dim]`` (row ``b``'s tokens are the last
    ``query_lens[b]`` of its context), the query lengths, the reference's output over the clean
    pools, and the padding tokens' mask ``[B, tokens]``. ``seed`` and ``options`` as
    ``pallas_cases.decode_case``'s."""
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
def test_prefill_reads_only_its_layer_of_stacked_pools(impl):
    """The engine's pools stack every layer; the op reads only the layer it is given (an int32
    scalar, traced inside the model's scan over layers): layer 2 of a stack of 4, the others NaN.
    The reference reads clean pools (it gathers whole pages, poisoned slots included, and masks
    after)."""
    pools, q, qlens, ref, padding = prefill_case(8, 16, 2, [40, 0, 17], [5, 0, 17], 17)
    out = paged_prefill_attention(q, *pools.stacked(2, 4, clean=impl == 'reference'), *pools.tables(), qlens, SCALE,
                                  jnp.int32(2), impl=impl)
    assert_matches(out, ref, jnp.float32, padding)


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
