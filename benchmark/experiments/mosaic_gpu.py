"""Paged decode attention as a Pallas kernel on the Mosaic GPU backend (Hopper TMA + wgmma): a
benchmark alternative to ``paged_decode.py``'s Pallas kernel that the API never runs
(same contract as ``paged_decode_attention_pallas``, without its sliding window and soft cap).

One warpgroup per (row, kv_head, split) walks the row's pages through a ring of ``stages``
shared-memory slots filled by TMA; scores and weighted values are two wgmmas inside an online
softmax in the log2 domain. The query group is padded to the 64 rows of a wgmma. Splits
(flash-decoding) write float32 partials merged by ``_flash_decoding.finish_splits``.

``interpret=True`` runs it in JAX's private Mosaic GPU interpreter, where the two products are
plain ``jnp.dot``s of the same shared-memory tiles. The design and the Mosaic GPU API it relies
on: benchmark/NOTES.md, "The Mosaic GPU decode kernel".
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._pallas_tiles import LOG2E
from pallas_kernels._flash_decoding import choose_num_splits, finish_splits, split_out_shapes

ROWS = 64                    # rows of a wgmma: the query group is padded to this
STEP_ROWS = 64               # a step holds at least this many positions (whole pages)
SWIZZLE = 128                # bytes; shared-memory tiles of (8, SWIZZLE // itemsize) elements
SMEM_BYTES = 227 * 1024      # shared memory of one H100 block


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """``stages``: shared-memory slots of K and V steps (the TMA ring; a 64-position bf16 step of
    head_dim 128 is 32 KB, so 2 slots leave room for two blocks per SM, each computing one step
    while the next arrives); ``target_programs`` / ``num_splits``: as ``_flash_decoding.DecodeConfig``;
    ``semantics``: Mosaic GPU's lowering semantics, ``'lane'`` or ``'warpgroup'`` (the one that runs
    Mosaic GPU's layout inference), or None for JAX's default."""
    stages: int = 2
    target_programs: int | None = None
    num_splits: int | None = None
    semantics: str | None = None


def supports(q, k_pages) -> bool:
    """16-bit floats (wgmma operands), head_dim a multiple of the 64-element swizzle tile, pages
    of 16..128 positions that tile a step, a query copy (the group and its tile's other rows, at
    most 64 query heads per KV head) that fits the 64 rows of a wgmma."""
    *_, kv_heads, _, block_size, head_dim = k_pages.shape
    return (q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 64 == 0 and head_dim <= 256
            and block_size in (16, 32, 64, 128)
            and _copied_rows(q.shape[-2], q.shape[-2] // kv_heads) <= ROWS)


def _interpretable(interpret):
    """The interpreter's parameters for ``interpret=True``. ``layout_cast`` (an identity on values)
    has no CPU rule in JAX 0.10, so one is registered for the interpreter, once."""
    if not interpret:
        return None
    from jax._src.interpreters import mlir
    from jax._src.pallas.mosaic_gpu import core as gpu_core
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    if not getattr(gpu_core.layout_cast_p, '_cpu_identity', False):
        mlir.register_lowering(gpu_core.layout_cast_p, lambda ctx, x, **_: [x], platform='cpu')
        gpu_core.layout_cast_p._cpu_identity = True
    return interpret if isinstance(interpret, InterpretGPUParams) else InterpretGPUParams()


def _compiler_params(semantics: str | None, interpret) -> dict:
    """``compiler_params`` for ``plgpu.kernel`` naming the lowering semantics, or nothing (JAX's
    default; and in the interpreter, which has no use for them)."""
    if semantics is None or interpret:
        return {}
    name = {'lane': 'Lane', 'warpgroup': 'Warpgroup'}[semantics]
    return dict(compiler_params=plgpu.CompilerParams(lowering_semantics=getattr(plgpu.LoweringSemantics, name)))


def _padded(rows: int) -> int:
    """``rows`` rounded up to the 8-row tile of the query buffer."""
    return -(-rows // 8) * 8


def _copied_rows(num_heads: int, group: int) -> int:
    """Rows of the query copy: whole 8-row tiles from an 8-aligned start that hold the group's
    rows (a group starts at a multiple of ``gcd(8, num_heads, group)``, so up to ``8 - that`` rows
    past a tile boundary)."""
    return _padded(group + 8 - math.gcd(8, num_heads, group))


def _query_rows(b, h, num_heads: int, group: int, copied: int, total_rows: int):
    """``(start, offset)``: the ``copied`` rows copied from the flattened queries start at
    ``start`` (inside the array), the group's own rows at ``offset`` within them. ``start`` is
    built as a product by 8 (and the minimum of two multiples of 8) so that Mosaic GPU's layout
    inference (JAX >= 0.11, and Warpgroup semantics) can prove the TMA source row a multiple of
    the 8-row tile of the swizzled destination; an arbitrary row fails it as unsatisfiable."""
    first = b * num_heads + h * group
    start = jnp.minimum(lax.div(first, 8) * 8, total_rows - copied)
    return start, first - start


def _scores(q_smem, k_tile, interpret: bool):
    """``Q K^T`` (float32 ``[ROWS, step]``) of the query buffer and a step's K tile."""
    if interpret:
        return jnp.dot(q_smem[...], k_tile[...].T, preferred_element_type=jnp.float32)

    def product(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_tile, (1, 0)))
        return acc_ref[...]
    return pl.run_scoped(product, plgpu.ACC((ROWS, k_tile.shape[0]), jnp.float32))


def _weighted_values(p, v_tile, interpret: bool):
    """``P V`` (float32 ``[ROWS, head_dim]``) of 16-bit weights in registers and a step's V tile."""
    if interpret:
        return jnp.dot(p, v_tile[...], preferred_element_type=jnp.float32)

    def product(acc_ref):
        plgpu.wgmma(acc_ref, p, v_tile)
        return acc_ref[...]
    return pl.run_scoped(product, plgpu.ACC((ROWS, v_tile.shape[1]), jnp.float32))


def _rows(x, like):
    """A ``[ROWS]`` per-row vector broadcast over ``like``'s columns."""
    return lax.broadcast_in_dim(x, like.shape, [0])


def _softmax_step(state, s, v_tile, interpret: bool):
    """Fold one step's log2-domain scores ``s`` (masked positions -inf) into (acc, max, sum)."""
    acc, m, l = state
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - _rows(m_new, s))
    pv = _weighted_values(p.astype(v_tile.dtype), v_tile, interpret)
    return acc * _rows(alpha, acc) + pv, m_new, l * alpha + p.sum(axis=1)


def _zero_tail(v_tile, valid_rows):
    """Zero the V rows at and after ``valid_rows`` in shared memory (0 * NaN would be NaN), made
    visible to the wgmma that reads the tile next."""
    rows = plgpu.broadcasted_iota(jnp.int32, v_tile.shape, 0, layout=plgpu.Layout.WGMMA)
    v_tile[...] = jnp.where(rows < valid_rows, v_tile[...], jnp.zeros((), v_tile.dtype))
    plgpu.commit_smem()


def _decode_kernel(layer_ref, lens_ref, tables_ref, q_ref, k_ref, v_ref, *refs, kv_heads, group, block_size,
                   num_splits, scale_log2, interpret):
    """One (row b, kv head h, split s): its share of the row's steps, then its output."""
    out_refs, (q_smem, k_smem, v_smem, o_smem, ml_smem, barriers, q_barrier) = refs[:-7], refs[-7:]
    b, h, s = lax.axis_index('b'), lax.axis_index('h'), lax.axis_index('s')
    stages = k_smem.shape[0]
    pages_per_step = max(1, STEP_ROWS // block_size)
    step_rows = pages_per_step * block_size
    length = jnp.minimum(lens_ref[b], tables_ref.shape[1] * block_size)
    last_page = pl.cdiv(length, block_size) - 1
    n_steps = pl.cdiv(length, step_rows)
    per_split = pl.cdiv(n_steps, num_splits)
    first, end = s * per_split, jnp.minimum((s + 1) * per_split, n_steps)
    pool_row = layer_ref[0] * kv_heads + h

    copied = _copied_rows(kv_heads * group, group)
    start, offset = _query_rows(b, h, kv_heads * group, group, copied, q_ref.shape[0])
    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(start, copied)], q_smem.at[pl.ds(0, copied)], q_barrier)

    def fetch(step, slot):
        for j in range(pages_per_step):       # pages past the row's end repeat its last page
            page = tables_ref[b, jnp.minimum(step * pages_per_step + j, last_page)]
            rows = pl.ds(j * block_size, block_size)
            plgpu.copy_gmem_to_smem(k_ref.at[pool_row, page], k_smem.at[slot, rows], barriers.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[pool_row, page], v_smem.at[slot, rows], barriers.at[slot])

    for i in range(stages):
        pl.when(first + i < end)(functools.partial(fetch, first + i, i))
    plgpu.barrier_wait(q_barrier)

    def body(step, state):
        slot = lax.rem(step - first, stages)
        plgpu.barrier_wait(barriers.at[slot])
        k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
        pos = step * step_rows + plgpu.broadcasted_iota(jnp.int32, (ROWS, step_rows), 1,
                                                        layout=plgpu.Layout.WGMMA)
        scores = jnp.where(pos < length, _scores(q_smem, k_tile, interpret) * scale_log2, -jnp.inf)
        pl.when((step + 1) * step_rows > length)(lambda: _zero_tail(v_tile, length - step * step_rows))
        state = _softmax_step(state, scores, v_tile, interpret)
        pl.when(step + stages < end)(lambda: fetch(step + stages, slot))
        return state

    head_dim = q_smem.shape[1]
    state = (plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA),
             plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
             plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
    state = lax.fori_loop(first, end, body, state)
    _store(out_refs, state, o_smem, ml_smem, b, s, h * group, offset, group)


def _store(out_refs, state, o_smem, ml_smem, b, s, head0, offset, group):
    """The group's rows (``offset ..`` of the buffer) as query heads ``head0 ..`` of row ``b``:
    the normalised output for one split, else split ``s``'s float32 partial, max and sum."""
    acc, m, l = state
    if len(out_refs) == 1:
        o_smem[...] = (acc / _rows(jnp.where(l > 0, l, 1.0), acc)).astype(o_smem.dtype)
        target = out_refs[0].at[b, pl.ds(head0, group)]
    else:
        o_smem[...] = acc
        ml_smem[0] = m
        ml_smem[1] = l
        target = out_refs[0].at[b, s, pl.ds(head0, group)]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(offset, group)], target)
    for ref, i in zip(out_refs[1:], (0, 1)):   # 4-byte values: too small for a TMA copy
        for g in range(group):
            ref[b, s, head0 + g] = ml_smem[i, offset + g]
    plgpu.wait_smem_to_gmem(0)


def _scratch(dtype, head_dim, block_size, stages, num_splits):
    """Shared memory: the query buffer, the K and V rings (tiled and swizzled for wgmma), the
    output staging buffer and the per-row max and sum, the ring's barriers and the query's. The
    ring has ``stages`` slots, or as many as fit."""
    pages_per_step = max(1, STEP_ROWS // block_size)
    step_rows = pages_per_step * block_size
    tiled = (plgpu.TilingTransform((8, SWIZZLE // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(SWIZZLE))
    out_dtype = dtype if num_splits == 1 else jnp.float32
    fixed = ROWS * head_dim * (jnp.dtype(dtype).itemsize + jnp.dtype(out_dtype).itemsize) + 2048
    stages = max(1, min(stages, (SMEM_BYTES - fixed) // (2 * step_rows * head_dim * jnp.dtype(dtype).itemsize)))
    return [plgpu.SMEM((ROWS, head_dim), dtype, transforms=tiled),
            plgpu.SMEM((stages, step_rows, head_dim), dtype, transforms=tiled),
            plgpu.SMEM((stages, step_rows, head_dim), dtype, transforms=tiled),
            plgpu.SMEM((ROWS, head_dim), out_dtype),
            plgpu.SMEM((2, ROWS), jnp.float32),
            plgpu.Barrier(num_arrivals=2 * pages_per_step, num_barriers=stages),   # one per TMA copy
            plgpu.Barrier()]


@functools.partial(jax.jit, static_argnames=('scale', 'config', 'interpret'))
def paged_decode_attention_mosaic(q, k_pages, v_pages, layer, block_tables, context_lens, scale: float,
                                  config: MosaicConfig = MosaicConfig(), interpret: bool = False):
    """Same contract as ``paged_decode.paged_decode_attention_pallas`` (inputs validated by the
    caller, pools layer-stacked, ``supports`` true)."""
    batch, num_heads, head_dim = q.shape
    layers, kv_heads, num_blocks, block_size, _ = k_pages.shape
    group = num_heads // kv_heads
    max_steps = pl.cdiv(block_tables.shape[1] * block_size, max(block_size, STEP_ROWS))
    num_splits = choose_num_splits(batch, kv_heads, max_steps, config)
    q_rows = q.reshape(batch * num_heads, head_dim)
    rows = max(_padded(batch * num_heads), _copied_rows(num_heads, group))   # whole 8-row tiles (llama: no pad)
    q_rows = jnp.pad(q_rows, ((0, rows - q_rows.shape[0]), (0, 0))) if rows > q_rows.shape[0] else q_rows
    shape = (layers * kv_heads, num_blocks, block_size, head_dim)
    kernel = functools.partial(
        _decode_kernel, kv_heads=kv_heads, group=group, block_size=block_size, num_splits=num_splits,
        scale_log2=scale * LOG2E, interpret=bool(interpret))
    outs = plgpu.kernel(
        kernel,
        out_type=split_out_shapes(batch, num_splits, num_heads, head_dim, q.dtype),
        grid=(batch, kv_heads, num_splits),
        grid_names=('b', 'h', 's'),
        scratch_types=_scratch(q.dtype, head_dim, block_size, config.stages, num_splits),
        interpret=_interpretable(interpret),
        **_compiler_params(config.semantics, interpret),
    )(layer.astype(jnp.int32).reshape(1), context_lens, block_tables, q_rows,
      k_pages.reshape(shape), v_pages.reshape(shape))
    return finish_splits(outs, q.dtype, bool(interpret))
