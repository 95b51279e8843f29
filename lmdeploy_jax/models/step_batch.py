"""What one compiled model step reads: a padded batch of token rows over the paged KV cache.

Shapes are static per compiled bucket: ``B`` rows (sequences, padded) by ``T`` tokens per row
(1 for decode, the chunk length for prefill). Padding rows have ``query_lens == 0`` and
``context_lens == 0``; padding tokens write their KV into block 0, which no sequence owns.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax


@jax.tree_util.register_dataclass
@dataclass
class StepBatch:
    token_ids: jax.Array      # int32 [B, T]   input tokens, left-aligned in each row
    positions: jax.Array      # int32 [B, T]   absolute position of each token in its sequence
    slot_mapping: jax.Array   # int32 [B, T]   KV slot (block * block_size + offset) each token writes;
                              #                padding -> block 0
    block_tables: jax.Array   # int32 [B, M]   the blocks of each sequence, in order; unused entries 0
    context_lens: jax.Array   # int32 [B]      tokens in the cache once this step's writes are done
    query_lens: jax.Array     # int32 [B]      valid tokens of the row (decode: 1; padding rows: 0)

    @property
    def num_rows(self) -> int:
        return self.token_ids.shape[0]

    @property
    def tokens_per_row(self) -> int:
        return self.token_ids.shape[1]
