"""RMSNorm as one Pallas kernel (Triton lowering).

Why a kernel: XLA runs an RMSNorm as two launches (a reduction for the mean of squares, then a
loop applying rsqrt and the weight), and a batch-1 decode step, bound by launches, has two norms
per layer. Here one program normalises a block of whole rows: it loads them once, reduces each in
registers and stores the result, one launch per norm. The models call the variant with the
residual add before the norm (``add_rms_norm``): the same program also loads the residual, adds it
(rounded to ``x``'s dtype, as the residual stream is) and stores the sum, so the add costs no launch.

Tiles: ``[block_rows, next_pow2(hidden)]`` (Triton tiles have power-of-two extents), so a hidden
size like 576 or 3584 is loaded under a mask over its tail; the masked columns load as zeros and
add nothing to the sum of squares, which is divided by the real ``hidden``. Rows past the last
are masked too. The arithmetic is the reference's: squares and sum in float32, rsqrt, the product
cast to ``x``'s dtype, then the weight's multiply in the promoted output dtype.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .._pallas_tiles import TRITON_FLOATS, next_pow2

# A program holds whole rows in registers: past this a row alone would spill (16384 float32
# columns over 8 warps is 64 registers a thread). Wider rows fall back to the reference.
MAX_HIDDEN = 16384


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """Launch knobs. ``tile_elems``: the elements of a program's tile, whole rows of
    ``next_pow2(hidden)`` (at least one row; fewer when there are fewer rows). ``num_warps``:
    None scales them with the tile, as Triton's layer-norm tutorial does (one warp per 256
    elements, 1 to 8). No loop runs, so ``num_stages`` has nothing to pipeline."""
    tile_elems: int = 4096
    num_warps: int | None = None
    num_stages: int = 1


def supports(x, weight) -> bool:
    """Shapes and dtypes this kernel handles: float inputs of the Triton dtypes, at least one
    row, and rows of at most ``MAX_HIDDEN``."""
    return (x.dtype in TRITON_FLOATS and weight.dtype in TRITON_FLOATS
            and x.size > 0 and x.shape[-1] <= MAX_HIDDEN)


def block_rows_for(rows: int, hidden: int, config: NormConfig) -> int:
    """Rows per program: as many whole padded rows as ``tile_elems`` holds, at least one, and no
    more than the (power-of-two rounded) row count."""
    return min(next_pow2(rows), max(1, config.tile_elems // next_pow2(hidden)))


def _tile(x_ref, block_rows):
    """This program's rows of ``x [rows, hidden]`` as (index, mask), and its columns (col, col_ok)."""
    rows, hidden = x_ref.shape
    row = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    col = jnp.arange(next_pow2(hidden))
    col_ok = col < hidden
    return (row[:, None], col[None, :]), (row < rows)[:, None] & col_ok[None, :], col, col_ok


def _scale_and_store(x, x_dtype, layer_ref, w_ref, o_ref, tile, eps):
    """Normalise the float32 rows ``x`` (cast back to ``x_dtype``), scale them by row
    ``layer_ref[0]`` of the stacked weights ``w_ref [layers * hidden]`` (flat: one scalar offset)
    and store them in ``o_ref``."""
    index, mask, col, col_ok = tile
    hidden = o_ref.shape[1]
    inv_rms = lax.rsqrt((x * x).sum(axis=1) / hidden + eps)
    normed = (x * inv_rms[:, None]).astype(x_dtype).astype(o_ref.dtype)
    weight = plgpu.load(w_ref.at[layer_ref[0] * hidden + col], mask=col_ok, other=0).astype(o_ref.dtype)
    plgpu.store(o_ref.at[index], weight[None, :] * normed, mask=mask)


def _norm_kernel(layer_ref, x_ref, w_ref, o_ref, *, block_rows, eps):
    """Rows ``[i * block_rows, (i + 1) * block_rows)`` of ``x [rows, hidden]``, normalised."""
    tile = _tile(x_ref, block_rows)
    x = plgpu.load(x_ref.at[tile[0]], mask=tile[1], other=0).astype(jnp.float32)
    _scale_and_store(x, x_ref.dtype, layer_ref, w_ref, o_ref, tile, eps)


def _add_norm_kernel(layer_ref, x_ref, r_ref, w_ref, s_ref, o_ref, *, block_rows, eps):
    """The same rows of ``s = x + r`` (rounded to ``x``'s dtype, as the residual stream is) into
    ``s_ref``, and of ``s`` normalised into ``o_ref``."""
    tile = _tile(x_ref, block_rows)
    index, mask = tile[:2]
    s = (plgpu.load(x_ref.at[index], mask=mask, other=0).astype(jnp.float32)
         + plgpu.load(r_ref.at[index], mask=mask, other=0).astype(jnp.float32)).astype(x_ref.dtype)
    plgpu.store(s_ref.at[index], s, mask=mask)
    _scale_and_store(s.astype(jnp.float32), x_ref.dtype, layer_ref, w_ref, o_ref, tile, eps)


@functools.partial(jax.jit, static_argnames=('eps', 'config', 'interpret'))
def rms_norm_pallas(x, weight, layer, eps: float, config: NormConfig = NormConfig(), interpret: bool = False,
                    residual=None):
    """Same contract as ``api.rms_norm`` (inputs validated there; ``weight [layers, hidden]``,
    ``layer`` an int32 scalar); with ``residual`` (``x``'s shape and dtype) that of
    ``api.add_rms_norm``: ``(x + residual, normalised sum)``."""
    hidden = x.shape[-1]
    rows = x.size // hidden
    block_rows = block_rows_for(rows, hidden, config)
    num_warps = config.num_warps or min(8, max(1, block_rows * next_pow2(hidden) // 256))
    normed = jax.ShapeDtypeStruct((rows, hidden), jnp.result_type(x.dtype, weight.dtype))
    rows_in = [x.reshape(rows, hidden)]
    if residual is None:
        kernel, out_shape = _norm_kernel, normed
    else:
        kernel, out_shape = _add_norm_kernel, (jax.ShapeDtypeStruct((rows, hidden), x.dtype), normed)
        rows_in.append(residual.reshape(rows, hidden))
    out = pl.pallas_call(
        functools.partial(kernel, block_rows=block_rows, eps=eps),
        grid=(pl.cdiv(rows, block_rows),),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name='rms_norm' if residual is None else 'add_rms_norm',
    )(layer.reshape(1), *rows_in, weight.reshape(-1))
    return jax.tree.map(lambda a: a.reshape(x.shape), out)
