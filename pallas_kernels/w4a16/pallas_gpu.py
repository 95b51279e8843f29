"""The W4A16 matmul as one Pallas kernel (Triton lowering): ``x [M, K] @ W [K, N]`` with ``W`` in
the packed tile layout (``layout.py``), dequantized in registers.

A program computes a ``[block_m, block_n]`` output tile over its share of K, one ``TILE_K`` tile
of K per loop step: it loads 16 packed rows of ``qweight`` (``[16, block_n]`` int32, the codes of
128 rows), and for each nibble ``j`` shifts and masks out 16 consecutive rows of codes, subtracts
the group's zero point and takes one tensor-core dot with the matching 16 columns of ``x``. The
group's scale multiplies the float32 sum of its dots once per group and tile (the scale is
constant along a group's rows), not every element of ``W``.

Two shapes of launch (``config_for``):
- decode (small M, bound by reading the weights): one 16-row M tile and narrow N tiles, with K
  split over ``splits`` programs so the grid covers the GPU; the float32 partial products
  ``[splits, M, N]`` are summed by XLA (small at small M);
- prefill (large M, bound by the tensor cores): wide M and N tiles, K not split, software
  pipelined over K by ``num_stages``.
Rows past M are masked (no padded copy of ``x``, no slice of the output); N must be a multiple of
the N tile, K of ``TILE_K``.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .._pallas_tiles import EXACT, MIN_DOT, TRITON_FLOATS, next_pow2
from .layout import NIBBLES, PIECE, TILE_K

TARGET_PROGRAMS = 264          # programs a decode launch aims for: two per SM of a 132-SM Hopper card
DECODE_MAX_M = 64              # at most this many rows take the decode launch
BLOCK_NS = (128, 64, 32, 16)


@dataclasses.dataclass(frozen=True)
class W4Config:
    """Launch knobs: the output tile ``[block_m, block_n]``, K split over ``splits`` programs
    (must divide K's ``TILE_K`` tiles), and Triton's ``num_warps``/``num_stages``."""
    block_m: int
    block_n: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def supports(x, qweight, scales) -> bool:
    """Inputs this kernel takes: a Triton float ``x``, K a multiple of ``TILE_K``, N a multiple of
    16, and a group size (K // groups) a multiple of 16 that divides ``TILE_K`` or is a multiple of it."""
    k, n = qweight.shape[0] * NIBBLES, qweight.shape[1]
    group = k // scales.shape[0]
    return (x.dtype in TRITON_FLOATS and k % TILE_K == 0 and n % MIN_DOT == 0 and group % PIECE == 0
            and (TILE_K % group == 0 or group % TILE_K == 0))


def _block_n(n: int, widest: int) -> int:
    return next(b for b in BLOCK_NS if b <= widest and n % b == 0)


def config_for(m: int, n: int, k: int) -> W4Config:
    """The launch for ``x [m, k] @ W [k, n]``: the decode shape up to ``DECODE_MAX_M`` rows, else prefill."""
    tiles = k // TILE_K
    if m <= DECODE_MAX_M:
        block_n = _block_n(n, 64)
        want = max(1, TARGET_PROGRAMS // (n // block_n))
        splits = max(s for s in range(1, tiles + 1) if tiles % s == 0 and s <= want)
        return W4Config(max(MIN_DOT, next_pow2(m)), block_n, splits, num_warps=4, num_stages=4)
    return W4Config(64 if m <= 256 else 128, _block_n(n, 128), 1, num_warps=4 if m <= 256 else 8, num_stages=3)


def _kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, block_m, block_n, tiles, group):
    """Output tile (program 0, program 1) of split ``program 2``: K tiles
    ``[program 2 * tiles, (program 2 + 1) * tiles)``. ``x [M, K]`` is read and the output
    ``[splits * M, N]`` written under a mask over the rows past M (no padded copy of ``x``)."""
    m = x_ref.shape[0]
    rows = pl.program_id(0) * block_m + jnp.arange(block_m)
    row_ok = (rows < m)[:, None]
    cols = pl.ds(pl.program_id(1) * block_n, block_n)
    first = pl.program_id(2) * tiles
    per_group = min(NIBBLES, group // PIECE)
    piece = jnp.arange(PIECE)

    def tile(t, acc):
        base = first + t
        words = w_ref[pl.ds(base * PIECE, PIECE), cols]                    # int32 [16, block_n]
        for g0 in range(0, NIBBLES, per_group):
            row = (base * TILE_K + g0 * PIECE) // group
            scale = s_ref[pl.ds(row, 1), cols].astype(jnp.float32)          # [1, block_n]
            zero = z_ref[pl.ds(row, 1), cols].astype(jnp.float32)
            part = None
            for j in range(g0, g0 + per_group):
                codes = (jnp.right_shift(words, 4 * j) & 0xF).astype(jnp.float32)
                w = (codes - zero).astype(x_ref.dtype)
                k_cols = base * TILE_K + j * PIECE + piece
                xs = plgpu.load(x_ref.at[rows[:, None], k_cols[None, :]], mask=row_ok, other=0)
                d = plgpu.dot(xs, w, precision=EXACT)
                part = d if part is None else part + d
            acc = acc + part * scale
        return acc

    acc = lax.fori_loop(0, tiles, tile, jnp.zeros((block_m, block_n), jnp.float32))
    n_cols = pl.program_id(1) * block_n + jnp.arange(block_n)
    plgpu.store(o_ref.at[(pl.program_id(2) * m + rows)[:, None], n_cols[None, :]], acc.astype(o_ref.dtype),
                mask=row_ok)


@functools.partial(jax.jit, static_argnames=('config', 'interpret'))
def w4a16_matmul_pallas(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array,
                        config: W4Config | None = None, interpret: bool = False) -> jax.Array:
    """Same contract as ``api.w4a16_matmul`` for ``x [M, K]`` (validated there; ``supports``
    true). ``config``: None picks ``config_for(M, N, K)``."""
    m, k = x.shape
    n = qweight.shape[1]
    config = config or config_for(m, n, k)
    tiles = k // TILE_K
    if tiles % config.splits or n % config.block_n:
        raise ValueError(f'{config} does not divide K={k} ({tiles} tiles) and N={n}')
    out_dtype = jnp.float32 if config.splits > 1 else x.dtype
    out = pl.pallas_call(
        functools.partial(_kernel, block_m=config.block_m, block_n=config.block_n, tiles=tiles // config.splits,
                          group=k // scales.shape[0]),
        grid=(pl.cdiv(m, config.block_m), n // config.block_n, config.splits),
        out_shape=jax.ShapeDtypeStruct((config.splits * m, n), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name='w4a16_matmul',
    )(x, qweight, scales, zeros)
    return out.reshape(config.splits, m, n).sum(axis=0).astype(x.dtype) if config.splits > 1 else out
