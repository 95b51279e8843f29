"""The device layout of 4-bit weights the W4A16 ops read, and conversion from codes.

``qweight`` int32 ``[K // 8, N]`` holds the codes of ``W [K, N]`` packed along K in tiles of
``T = layout_tile(K)`` rows (``TILE_K`` = 128 whenever K is a multiple of it; else the largest of
64, 32, 16, 8 dividing K): in tile ``t``, nibble ``j`` (bits ``4j .. 4j+3``) of packed row
``t * T / 8 + r`` holds row ``t * T + j * T / 8 + r``. With ``T = 128``, unpacking nibble ``j`` of
a tile's 16 packed rows gives 16 consecutive rows of ``W``, the K extent of one tensor-core dot,
with no shuffle (the Pallas kernel takes only this case; smaller tiles serve models whose widths
are not multiples of 128, e.g. 576, through the XLA reference). A split of K over devices at a
multiple of ``T`` splits ``qweight`` at the matching packed row, so tensor parallelism slices it
like any other array.

``scales`` and ``zeros`` ``[K // group, N]`` (float16 or float32, zeros holding integers 0..15)
give ``W[k, n] = (code - zeros[k // group, n]) * scales[k // group, n]``.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

TILE_K = 128                  # rows of K per packed tile, as the Pallas kernel reads them
PIECE = 16                    # rows of K one nibble of a TILE_K tile's packed rows covers
NIBBLES = 8                   # codes per int32 word


def layout_tile(k: int) -> int:
    """Rows per packed tile for ``K = k``: the largest of 128, 64, 32, 16, 8 dividing it;
    ValueError when 8 does not."""
    for tile in (TILE_K, 64, 32, 16, NIBBLES):
        if k % tile == 0:
            return tile
    raise ValueError(f'K={k} is not a multiple of {NIBBLES}: 4-bit codes pack {NIBBLES} rows to a word')


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 codes ``[K, N]`` (0..15) -> ``qweight`` int32 ``[K // 8, N]`` in the tile layout."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f'codes must be [K, N], got {codes.shape}')
    (k, n), tile = codes.shape, layout_tile(codes.shape[0])
    tiles = codes.reshape(k // tile, NIBBLES, tile // NIBBLES, n).astype(np.uint32)
    words = np.zeros((k // tile, tile // NIBBLES, n), np.uint32)
    for j in range(NIBBLES):
        words |= tiles[:, j] << np.uint32(4 * j)
    return words.reshape(k // NIBBLES, n).view(np.int32)


def unpack_codes(qweight) -> jnp.ndarray:
    """``pack_codes``'s inverse in XLA: int32 ``[K // 8, N]`` -> int32 codes ``[K, N]``."""
    rows, n = qweight.shape
    per_tile = layout_tile(rows * NIBBLES) // NIBBLES
    words = qweight.reshape(rows // per_tile, 1, per_tile, n)
    shifts = (4 * jnp.arange(NIBBLES, dtype=jnp.int32)).reshape(1, NIBBLES, 1, 1)
    return (jnp.right_shift(words, shifts) & 0xF).reshape(rows * NIBBLES, n)
