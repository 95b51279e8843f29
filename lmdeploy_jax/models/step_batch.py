"""What one compiled model step reads: a padded batch of token rows over the paged KV cache.

Shapes are static per compiled bucket: ``B`` rows (sequences, padded) by ``T`` tokens per row
(1 for decode, the chunk length for prefill). Padding rows have ``query_lens == 0`` and
``context_lens == 0``; padding tokens write their KV into block 0, which no sequence owns.

A mixed step (``MixedBatch``) feeds a decode segment ``[Bd, 1]`` and a prefill segment ``[Bp, T]``
in one call: the dense layers run on their ``Bd + Bp * T`` tokens as one row, attention splits
them again (``layers/attention.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


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

    def last_hidden(self, hidden: jax.Array) -> jax.Array:
        """``[B, hidden]``: each row's hidden state at its last valid token, from ``hidden [B, T, hidden]``
        (padding rows: their first position's)."""
        return hidden[jnp.arange(self.num_rows), jnp.maximum(self.query_lens - 1, 0)]


def _rows_concatenated(a, b):
    """``a`` and ``b`` concatenated along rows, numpy on the host, jax in a trace."""
    host = isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    return np.concatenate([a, b]) if host else jnp.concatenate([a, b])


@jax.tree_util.register_dataclass
@dataclass
class MixedBatch:
    """A decode segment (``decode [Bd, 1]``, one token per row, as a decode call's first step)
    and a prefill segment (``prefill [Bp, T]``) run as one step. The per-token fields read as one
    row ``[1, Bd + Bp * T]`` (decode tokens first, then the prefill rows' tokens in order) and the
    per-row fields as ``Bd + Bp`` rows (decode rows first): what the dense layers, the token
    pool write and the sampler see. Sampling row ``i`` is decode row ``i`` for ``i < Bd``, else
    prefill row ``i - Bd``."""
    decode: StepBatch
    prefill: StepBatch

    def _tokens(self, name: str) -> jax.Array:
        return _rows_concatenated(getattr(self.decode, name).reshape(-1), getattr(self.prefill, name).reshape(-1))[None]

    @property
    def token_ids(self) -> jax.Array:
        return self._tokens('token_ids')

    @property
    def positions(self) -> jax.Array:
        return self._tokens('positions')

    @property
    def slot_mapping(self) -> jax.Array:
        return self._tokens('slot_mapping')

    @property
    def block_tables(self) -> jax.Array:
        return _rows_concatenated(self.decode.block_tables, self.prefill.block_tables)

    @property
    def context_lens(self) -> jax.Array:
        return _rows_concatenated(self.decode.context_lens, self.prefill.context_lens)

    @property
    def query_lens(self) -> jax.Array:
        return _rows_concatenated(self.decode.query_lens, self.prefill.query_lens)

    @property
    def num_rows(self) -> int:
        return self.decode.num_rows + self.prefill.num_rows

    @property
    def decode_tokens(self) -> int:
        """Tokens of the decode segment: the first ``Bd`` of the joined row."""
        return self.decode.num_rows

    def last_hidden(self, hidden: jax.Array) -> jax.Array:
        """``[Bd + Bp, hidden]`` from ``hidden [1, Bd + Bp * T, hidden]``: each decode row's token,
        then each prefill row's last valid token."""
        bd, t = self.decode.num_rows, self.prefill.tokens_per_row
        last = bd + jnp.arange(self.prefill.num_rows) * t + jnp.maximum(self.prefill.query_lens - 1, 0)
        return hidden[0, jnp.concatenate([jnp.arange(bd), last])]
