"""The static shapes every compiled step is padded to, chosen once at start-up.

Decode steps are ``[B, 1]`` for B in ``decode_batch``; prefill steps are ``[B, T]`` for each
(B, T) in ``prefill``, where B * T never exceeds the prefill token budget. Every step also carries
the same block-table width ``max_blocks`` (a whole session). A small set keeps start-up (one
compile per shape) short; padding waste stays under 2x in T and 4x in prefill rows.
"""
from __future__ import annotations

from dataclasses import dataclass


def geometric_upto(limit: int, start: int = 1, factor: int = 2) -> list[int]:
    """``start, start*factor, ...`` below ``limit``, then ``limit`` itself."""
    out, n = [], start
    while n < limit:
        out.append(n)
        n *= factor
    out.append(limit)
    return out


@dataclass(frozen=True)
class Buckets:
    decode_batch: tuple[int, ...]          # batch sizes of decode steps, ascending
    prefill: tuple[tuple[int, int], ...]   # (rows, tokens per row) of prefill steps
    max_blocks: int                        # block-table width: blocks of a full session

    @property
    def max_batch(self) -> int:
        return self.decode_batch[-1]

    @property
    def max_chunk(self) -> int:
        """The longest prefill chunk one row can take."""
        return max(t for _, t in self.prefill)

    def decode_shape(self, rows: int) -> int:
        """The smallest decode batch bucket holding ``rows``."""
        for b in self.decode_batch:
            if b >= rows:
                return b
        raise ValueError(f'{rows} decode rows exceed the largest bucket {self.max_batch}')

    def prefill_shape(self, chunks: list[int]) -> tuple[int, int] | None:
        """The cheapest (B, T) holding these chunk lengths, or None if no compiled shape does."""
        rows, longest = len(chunks), max(chunks)
        fits = [(b * t, b, t) for b, t in self.prefill if b >= rows and t >= longest]
        return min(fits)[1:] if fits else None

    def all_shapes(self) -> list[tuple[int, int]]:
        return [(b, 1) for b in self.decode_batch] + list(self.prefill)


def make_buckets(max_batch_size: int, max_prefill_tokens: int, session_len: int, block_size: int,
                 decode_batch: list[int] | None = None, prefill_tokens: list[int] | None = None,
                 prefill_batch: list[int] | None = None, growth: int = 2) -> Buckets:
    """Default buckets (powers of ``growth``; prefill rows in powers of four), or the ones given.

    A larger ``growth`` means fewer shapes: more padding per step, but a shorter start-up, which
    is the better trade on a CPU, where compiling dominates. ValueError when the decode buckets do
    not reach ``max_batch_size`` or no prefill shape fits the token budget."""
    max_blocks = -(-session_len // block_size)
    decode = sorted(set(decode_batch or geometric_upto(max_batch_size, factor=growth)))
    longest = min(max_prefill_tokens, session_len)
    tokens = sorted(set(prefill_tokens or geometric_upto(longest, start=min(32, longest), factor=growth)))
    rows = sorted(set(prefill_batch or geometric_upto(max_batch_size, factor=4)))
    if decode[-1] < max_batch_size:
        raise ValueError(f'decode buckets {decode} do not reach max_batch_size={max_batch_size}')
    prefill = tuple((b, t) for t in tokens for b in rows
                    if b * t <= max(max_prefill_tokens, t) and b <= max_batch_size)
    if not prefill:
        raise ValueError(f'no prefill shape fits: each of rows {rows} x tokens {tokens} has more than '
                         f'max_prefill_token_num={max_prefill_tokens} tokens or more rows than '
                         f'max_batch_size={max_batch_size}')
    return Buckets(tuple(decode), prefill, max_blocks)
