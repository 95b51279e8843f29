"""Grouped matmul as one Pallas kernel (Triton lowering).

Why a kernel: XLA may run ``ragged_dot`` as one dense product per group over every row, which
reads every group's weights and multiplies every row by each of them. Here each program computes
one tile of rows of one group against one column tile of that group's weights, so the work and
the weight bytes read scale with the rows routed, and a group that receives no rows (an expert no
token chose) is never read.

The plan (``tile_plan``, computed by XLA before the launch, as MaxText's megablox computes its
group metadata): the rows ``[0, M)`` split into the groups' spans ``[start_g, end_g)`` and a tail
span past the last group (rows the group sizes do not cover, which come out as zeros). Each span
is cut into tiles of ``block_m`` rows starting at the span's first row, so no tile crosses a span
and every output row is written by exactly one tile. The launch has a static count of item slots,
``M // block_m + min(G + 1, M)``, which bounds the tiles of any group sizes (a span of ``s`` rows
takes ``s // block_m + 1`` tiles at most, and at most ``min(G + 1, M)`` spans are non-empty);
slots past the real tiles store nothing and read nothing. Item ``i`` carries its group, its
first row and its span's end.

A program (column tile ``j``, item ``i``) loops over K in ``block_k`` steps: loads a ``[block_m,
block_k]`` lhs tile (rows past the span masked to zero; with ``lhs_rows``, row ``r`` of the tile
read from ``lhs[lhs_rows[r]]``, so the rows sorted by group are gathered as they are loaded, as
vLLM's fused-MoE kernel reads its sorted token ids, instead of being copied out first) and the
``[block_k, block_n]`` (or, with ``transpose_rhs``, ``[block_n, block_k]``) tile of
``rhs[group]``, accumulates their dot in float32 and stores the ``[block_m, block_n]`` result in
the output's dtype under the span's row mask (with ``out_rows``, row ``r`` at
``out[out_rows[r]]``: the products go back to the choices' own order as they are stored). Tail
items run no K steps and store zeros. The column tiles vary fastest in the launch, so the
programs running together share one lhs tile and the next item (mostly the same group) finds
that group's weight tiles in L2. ``rhs`` is every layer's groups, ``[layers * G, ...]`` (a free
reshape), the layer's row found in the kernel, so no XLA op slices the layer out before it.

Tiles: Triton dots need every extent at least 16 and a power of two; K and N need not be multiples
of the tiles (masked). Float32 dots are IEEE (``EXACT``), which the float32 engine needs.
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


@dataclasses.dataclass(frozen=True)
class GroupedConfig:
    """Launch knobs. ``block_m``: rows per tile (None: ``block_m_for``, from the rows per group);
    ``block_n``: columns per tile (None: 64 for 16-row tiles, where a decode step's few items need
    more programs to cover the card, else 128); ``block_k``: the K step (16-bit; float32 takes
    half); ``num_warps``, ``num_stages``: Triton's."""
    block_m: int | None = None
    block_n: int | None = None
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def supports(lhs, rhs, rows: int) -> bool:
    """Inputs this kernel handles: both of one Triton float dtype, at least one row (``rows``) to
    compute."""
    return lhs.dtype in TRITON_FLOATS and rhs.dtype == lhs.dtype and rows > 0


def block_m_for(rows: int, groups: int) -> int:
    """Rows per tile: the mean rows per group rounded up to a power of two, from 16 (the smallest
    Triton dot: a decode step's groups of one or two rows) to 64."""
    return min(64, max(MIN_DOT, next_pow2(-(-rows // groups))))


def max_items(rows: int, groups: int, block_m: int) -> int:
    """The launch's item slots: a bound on the tiles of any group sizes (module docstring)."""
    return rows // block_m + min(groups + 1, rows)


def tile_plan(group_sizes: jax.Array, rows: int, block_m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(group, first_row, span_end)``, each int32 ``[max_items]``: item ``i``'s group (``G`` for
    the tail span of rows no group covers, ``G + 1`` for an unused slot), its first row and its
    span's end (an unused slot's span is empty). ``group_sizes`` int32 ``[G]``; sizes are clipped
    so the spans stay inside ``[0, rows)``."""
    groups = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes, 0)), rows)
    span_ends = jnp.concatenate([ends, jnp.full((1,), rows, jnp.int32)]).astype(jnp.int32)       # [G + 1]
    span_starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), span_ends[:-1]])
    tiles = pl.cdiv(span_ends - span_starts, block_m)
    tiles_before = jnp.cumsum(tiles) - tiles                                     # first item of each span
    item = jnp.arange(max_items(rows, groups, block_m), dtype=jnp.int32)
    # one fused comparison of [items, G + 1] (the default method is a loop of launches)
    span = jnp.searchsorted(jnp.cumsum(tiles), item, side='right', method='compare_all').astype(jnp.int32)
    used = span <= groups
    at = jnp.minimum(span, groups)
    first_row = jnp.where(used, span_starts[at] + (item - tiles_before[at]) * block_m, 0)
    span_end = jnp.where(used, span_ends[at], 0)
    return span, first_row, span_end


def _grouped_kernel(group_ref, first_ref, end_ref, layer_ref, *refs, groups, block_m, block_n, block_k,
                    transpose_rhs, gathered, scattered):
    """Column tile ``program_id(0)`` of item ``program_id(1)`` (module docstring); ``rhs_ref`` is
    every layer's groups, ``[layers * groups, ...]``; the refs start with ``lhs_rows`` when
    ``gathered``, then ``out_rows`` when ``scattered``."""
    refs = list(refs)
    rows_ref = refs.pop(0) if gathered else None
    out_rows_ref = refs.pop(0) if scattered else None
    lhs_ref, rhs_ref, o_ref = refs
    j, i = pl.program_id(0), pl.program_id(1)
    group, first, end = group_ref[i], first_ref[i], end_ref[i]
    K = lhs_ref.shape[1]
    N = o_ref.shape[1]
    rows = first + jnp.arange(block_m)
    row_ok = rows < end
    sources = plgpu.load(rows_ref.at[rows], mask=row_ok, other=0) if gathered else rows
    # masked rows target past the output (never stored; no two rows of a tile share a target)
    targets = plgpu.load(out_rows_ref.at[rows], mask=row_ok, other=o_ref.shape[0]) if scattered else rows
    cols = j * block_n + jnp.arange(block_n)
    col_ok = cols < N
    g = layer_ref[0] * groups + jnp.minimum(group, groups - 1)          # its weights' row in the stack
    steps = (group < groups).astype(jnp.int32) * pl.cdiv(K, block_k)    # the tail and unused slots: none

    def body(step, acc):
        ks = step * block_k + jnp.arange(block_k)
        k_ok = ks < K
        a = plgpu.load(lhs_ref.at[sources[:, None], ks[None, :]], mask=row_ok[:, None] & k_ok[None, :], other=0)
        if transpose_rhs:
            b = plgpu.load(rhs_ref.at[g, cols[:, None], ks[None, :]], mask=col_ok[:, None] & k_ok[None, :], other=0)
            return acc + plgpu.dot(a, b, trans_b=True, precision=EXACT)
        b = plgpu.load(rhs_ref.at[g, ks[:, None], cols[None, :]], mask=k_ok[:, None] & col_ok[None, :], other=0)
        return acc + plgpu.dot(a, b, precision=EXACT)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(o_ref.at[targets[:, None], cols[None, :]], acc.astype(o_ref.dtype),
                mask=row_ok[:, None] & col_ok[None, :])


@functools.partial(jax.jit, static_argnames=('transpose_rhs', 'config', 'interpret'))
def grouped_matmul_pallas(lhs, rhs, group_sizes, layer, transpose_rhs: bool, config: GroupedConfig = GroupedConfig(),
                          interpret: bool = False, lhs_rows=None, out_rows=None):
    """Same contract as ``api.grouped_matmul`` (inputs validated there; ``rhs`` layer-stacked
    ``[layers, G, ...]``, ``layer`` an int32 scalar)."""
    K = lhs.shape[1]
    M = lhs.shape[0] if lhs_rows is None else lhs_rows.shape[0]
    layers, groups = rhs.shape[:2]
    N = rhs.shape[-2] if transpose_rhs else rhs.shape[-1]
    block_m = config.block_m or block_m_for(M, groups)
    block_n = config.block_n or (64 if block_m == MIN_DOT else 128)
    block_n = min(block_n, max(MIN_DOT, next_pow2(N)))
    block_k = config.block_k if lhs.dtype.itemsize <= 2 else config.block_k // 2
    block_k = max(MIN_DOT, min(block_k, next_pow2(K)))
    plan = tile_plan(group_sizes, M, block_m)
    kernel = functools.partial(_grouped_kernel, groups=groups, block_m=block_m, block_n=block_n, block_k=block_k,
                               transpose_rhs=transpose_rhs, gathered=lhs_rows is not None,
                               scattered=out_rows is not None)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(N, block_n), plan[0].shape[0]),
        out_shape=jax.ShapeDtypeStruct((M, N), lhs.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name='grouped_matmul',
    )(*plan, layer.reshape(1), *(rows for rows in (lhs_rows, out_rows) if rows is not None), lhs,
      rhs.reshape(layers * groups, *rhs.shape[2:]))        # free, row-major: the kernel addresses the layer
