"""Host-side owner of the paged KV pool's block ids: free list, reference counts, prefix cache.

Block 0 is never handed out: padding tokens write their KV there, so a padded step can never
touch a block a sequence owns. A full block can be *registered* under the hash of every token up
to and including it; another sequence whose tokens hash the same shares it (its count goes up)
instead of recomputing it. A registered block whose count drops to zero is not freed at once: it
stays cached, evictable in least-recently-used order when the free list runs dry.
"""
from __future__ import annotations

from collections import OrderedDict, deque

PADDING_BLOCK = 0


def chain_hashes(tokens: list[int], block_size: int, known: list[int]) -> list[int]:
    """Hashes of every full block of ``tokens``, each covering all tokens up to the block's end.

    ``known`` are hashes already computed for a prefix of the blocks (they are extended, not redone).
    """
    hashes = list(known)
    prev = hashes[-1] if hashes else 0
    for i in range(len(hashes), len(tokens) // block_size):
        prev = hash((prev, tuple(tokens[i * block_size:(i + 1) * block_size])))
        hashes.append(prev)
    return hashes


class BlockManager:
    """Allocates, shares and frees the pool's blocks (ids ``1 .. num_blocks - 1``)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 2:
            raise ValueError(f'the KV pool needs at least 2 blocks (block 0 is reserved), got {num_blocks}')
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(1, num_blocks))   # blocks holding nothing worth keeping
        self._refs = [0] * num_blocks
        self._by_hash: dict[int, int] = {}                     # prefix hash -> registered block
        self._hash_of: dict[int, int] = {}                     # registered block -> its hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced registered blocks, LRU first
        self.prefix_hit_blocks = 0                             # blocks reused from the prefix cache

    def num_free(self) -> int:
        """Blocks an allocation can take now (free ones plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    def num_cached(self) -> int:
        return len(self._by_hash)

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks with a count of one; evicts least-recently-used cached blocks if needed."""
        if n > self.num_free():
            raise MemoryError(f'asked for {n} KV blocks, {self.num_free()} free')
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; an unreferenced block is freed or, if registered, kept cached."""
        for block in blocks:
            self._refs[block] -= 1
            assert self._refs[block] >= 0, f'block {block} released more often than taken'
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None     # most recently used goes last
                else:
                    self._free.append(block)

    def register(self, block: int, block_hash: int) -> None:
        """Offer a full, written block to the prefix cache; the first block of a given hash wins."""
        if self.enable_prefix_caching and block_hash not in self._by_hash and block not in self._hash_of:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash

    def match(self, hashes: list[int]) -> list[int]:
        """The cached blocks of the longest prefix of ``hashes``, each taken (count + 1)."""
        blocks = []
        if not self.enable_prefix_caching:
            return blocks
        for block_hash in hashes:
            block = self._by_hash.get(block_hash)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            blocks.append(block)
        self.prefix_hit_blocks += len(blocks)
        return blocks

    def forget_cached(self) -> None:
        """Empty the prefix cache (its blocks' contents were lost); referenced blocks stay taken."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._by_hash.clear()
        self._hash_of.clear()

    def ref_count(self, block: int) -> int:
        return self._refs[block]
