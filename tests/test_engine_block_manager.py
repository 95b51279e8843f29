"""The KV block manager and the bucket table: reference counts, block 0 reserved, prefix sharing with
LRU eviction, and the compiled shapes a batch is padded to."""
from __future__ import annotations

import pytest

from lmdeploy_jax.engine.block_manager import PADDING_BLOCK, BlockManager, chain_hashes
from lmdeploy_jax.engine.buckets import make_buckets


def test_allocate_release_never_hands_out_block_zero(rng):
    bm = BlockManager(num_blocks=9, block_size=4)
    assert bm.num_free() == 8
    taken = bm.allocate(int(rng.integers(1, 9)))
    assert PADDING_BLOCK not in taken and len(set(taken)) == len(taken)
    rest = bm.allocate(bm.num_free())
    assert sorted(taken + rest) == list(range(1, 9)) and bm.num_free() == 0
    with pytest.raises(MemoryError):
        bm.allocate(1)
    bm.release(taken)
    assert bm.num_free() == len(taken)
    bm.release(rest)
    assert bm.num_free() == 8


def test_chain_hashes_cover_the_whole_prefix(rng):
    a = rng.integers(0, 1000, 13).tolist()
    b = list(a)
    b[1] = (b[1] + 1) % 1000                     # differs in the first block only
    ha, hb = chain_hashes(a, 4, []), chain_hashes(b, 4, [])
    assert len(ha) == 3                          # 13 tokens: 3 full blocks
    assert all(x != y for x, y in zip(ha, hb))   # every later block hash depends on the first block
    assert chain_hashes(a, 4, ha[:1]) == ha      # extending known hashes gives the same chain


def test_prefix_sharing_refcounts_and_lru_eviction(rng):
    bm = BlockManager(num_blocks=5, block_size=4, enable_prefix_caching=True)
    tokens = rng.integers(0, 1000, 8).tolist()
    hashes = chain_hashes(tokens, 4, [])
    owner = bm.allocate(2)
    for block, h in zip(owner, hashes):
        bm.register(block, h)
    shared = bm.match(hashes)
    assert shared == owner and bm.prefix_hit_blocks == 2 and bm.ref_count(owner[0]) == 2
    bm.release(owner)
    bm.release(shared)
    assert bm.num_free() == 4 and bm.num_cached() == 2   # unreferenced but still cached
    assert bm.match(hashes) == owner                     # a later sequence still finds them
    bm.release(owner)
    # the first free blocks go first; then the least recently used cached block is evicted
    fresh = bm.allocate(3)
    assert owner[0] in fresh and owner[1] not in fresh and bm.num_cached() == 1
    assert bm.match(hashes) == []                        # the chain breaks at the evicted first block


def test_disabled_prefix_cache_frees_at_once(rng):
    bm = BlockManager(num_blocks=4, block_size=2)
    blocks = bm.allocate(2)
    bm.register(blocks[0], 123)
    assert bm.match([123]) == [] and bm.num_cached() == 0
    bm.release(blocks)
    assert bm.num_free() == 3


def test_buckets_pick_the_cheapest_compiled_shape():
    b = make_buckets(max_batch_size=8, max_prefill_tokens=256, session_len=200, block_size=16)
    assert b.decode_batch == (1, 2, 4, 8) and b.max_blocks == 13
    assert b.decode_shape(3) == 4
    assert all(rows * t <= 256 for rows, t in b.prefill) and b.max_chunk == 200
    assert b.prefill_shape([5, 30]) == (4, 32)
    assert b.prefill_shape([100]) == (1, 128)
    assert b.prefill_shape([100] * 3) is None             # 4 x 128 is over the budget
    with pytest.raises(ValueError):
        b.decode_shape(9)
    # given buckets none of which fits the budget are refused, not left to fail every prefill later
    with pytest.raises(ValueError, match=r'no prefill shape fits: each of rows \[4\] x tokens \[64\] has more than '
                                         r'max_prefill_token_num=64 tokens'):
        make_buckets(max_batch_size=4, max_prefill_tokens=64, session_len=80, block_size=16, prefill_tokens=[64],
                     prefill_batch=[4])
