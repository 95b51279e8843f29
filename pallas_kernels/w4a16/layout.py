"""The device layout of 4-bit weights the W4A16 ops read, and conversion from codes.

``qweight`` int32 ``[K // 8, N]`` holds the codes of ``W [K, N]`` packed along K in tiles of
``TILE_K`` rows: in tile ``t``, nibble ``j`` (bits ``4j .. 4j+3``) of packed row ``t * 16 + r``
holds row ``t * TILE_K + j * 16 + r``. Unpacking nibble ``j`` of a tile's 16 packed rows thus gives
16 consecutive rows of ``W``, the K extent of one tensor-core dot, with no shuffle. ``K`` must be a
multiple of ``TILE_K``; a split of K over devices at a multiple of ``TILE_K`` splits ``qweight`` at
the matching packed row, so tensor parallelism slices it like any other array.

``scales`` and ``zeros`` ``[K // group, N]`` (float16 or float32, zeros holding integers 0..15)
give ``W[k, n] = (code - zeros[k // group, n]) * scales[k // group, n]``.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

TILE_K = 128                  # rows of K per packed tile
PIECE = 16                    # rows of K one nibble of a tile's packed rows covers
NIBBLES = TILE_K // PIECE     # 8


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 codes ``[K, N]`` (0..15) -> ``qweight`` int32 ``[K // 8, N]`` in the tile layout.
    ValueError when K is not a multiple of ``TILE_K``."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] % TILE_K:
        raise ValueError(f'codes must be [K, N] with K a multiple of {TILE_K}, got {codes.shape}')
    k, n = codes.shape
    tiles = codes.reshape(k // TILE_K, NIBBLES, PIECE, n).astype(np.uint32)
    words = np.zeros((k // TILE_K, PIECE, n), np.uint32)
    for j in range(NIBBLES):
        words |= tiles[:, j] << np.uint32(4 * j)
    return words.reshape(k // NIBBLES, n).view(np.int32)


def unpack_codes(qweight) -> jnp.ndarray:
    """``pack_codes``'s inverse in XLA: int32 ``[K // 8, N]`` -> int32 codes ``[K, N]``."""
    rows, n = qweight.shape
    words = qweight.reshape(rows // PIECE, 1, PIECE, n)
    shifts = (4 * jnp.arange(NIBBLES, dtype=jnp.int32)).reshape(1, NIBBLES, 1, 1)
    return (jnp.right_shift(words, shifts) & 0xF).reshape(rows * NIBBLES, n)
