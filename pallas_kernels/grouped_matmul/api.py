"""The grouped matmul the models call: the Pallas kernel on a GPU, the XLA reference elsewhere,
behind one function, so the models never change when an implementation does."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .._checks import check_int32, layer_index, require
from .._dispatch import choose_impl
from .reference import grouped_matmul_reference


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, layer: jax.Array | int | None = None, *,
                   lhs_rows: jax.Array | None = None, out_rows: jax.Array | None = None,
                   transpose_rhs: bool = False, impl: str | None = None) -> jax.Array:
    """``out [M, N]`` in ``lhs``'s dtype: the rows of ``lhs [M, K]`` in consecutive groups of
    ``group_sizes`` (int32 ``[G]``; group ``g`` is rows ``[sum(sizes[:g]), sum(sizes[:g + 1]))``),
    group ``g``'s rows times ``rhs[g]``: ``rhs [G, K, N]``, or with ``transpose_rhs`` ``rhs [G, N,
    K]`` (a layer's ``[out, in]`` weights, Hugging Face's orientation) times its transpose. Rows
    past the sizes' sum come out as zeros; sizes summing past M are cut at M. Products accumulate
    in float32. A mixture of experts' tokens sorted by expert, each expert's weights one group.
    ``lhs_rows`` (int32 ``[M]``, values in ``[0, T)``): the grouped rows are ``lhs[lhs_rows]``
    (``lhs [T, K]`` then: each token once, the rows its experts' choices, sorted by expert), read
    in place by the kernel rather than copied out first.
    ``out_rows`` (int32 ``[M]``, a permutation of ``[0, M)``): row ``r`` of the product is
    ``out[out_rows[r]]`` (the choices back in their own order), stored there by the kernel rather
    than permuted by a copy after it.
    ``rhs`` may also be every layer's groups stacked, ``[layers, G, ...]``, with ``layer`` (an
    int32 scalar) the one to use: inside the models' layer loop the kernel then reads that layer's
    weights in place, where slicing them out first would copy every group's weights each step.
    ``impl``: see ``pallas_kernels._dispatch`` (default: the Pallas kernel on a GPU)."""
    require(lhs.ndim == 2 and jnp.issubdtype(lhs.dtype, jnp.floating),
            f'lhs must be a float array [M, K], got {lhs.dtype} {tuple(lhs.shape)}')
    layout = '[G, N, K]' if transpose_rhs else '[G, K, N]'
    stack = rhs.ndim == 4
    require(rhs.ndim in (3, 4) and rhs.shape[-1 if transpose_rhs else -2] == lhs.shape[1],
            f'rhs must be {layout} or layer-stacked [layers, *{layout}] with K = {lhs.shape[1]} (lhs\'s columns), '
            f'got {tuple(rhs.shape)}')
    require(rhs.dtype == lhs.dtype, f'rhs dtype {rhs.dtype} does not match lhs dtype {lhs.dtype}')
    layer = layer_index(layer, stack, f'layer-stacked rhs [layers, *{layout}]')
    rhs = rhs if stack else rhs[None]
    check_int32('group_sizes', group_sizes, (rhs.shape[1],))
    if lhs_rows is not None:
        require(lhs_rows.ndim == 1, f'lhs_rows must be [M], got shape {tuple(lhs_rows.shape)}')
        check_int32('lhs_rows', lhs_rows)
    rows = lhs.shape[0] if lhs_rows is None else lhs_rows.shape[0]
    if out_rows is not None:
        check_int32('out_rows', out_rows, (rows,))
    # -- implementation choice: the Pallas GPU kernel, else the reference --
    from . import pallas_gpu
    chosen = choose_impl(impl, pallas_gpu.supports(lhs, rhs, rows))
    if chosen == 'reference':
        out = grouped_matmul_reference(lhs if lhs_rows is None else lhs[lhs_rows], rhs[layer], group_sizes,
                                       transpose_rhs)
        return out if out_rows is None else out[jnp.argsort(out_rows)]
    return pallas_gpu.grouped_matmul_pallas(lhs, rhs, group_sizes, layer, transpose_rhs,
                                            interpret=chosen == 'pallas_interpret', lhs_rows=lhs_rows,
                                            out_rows=out_rows)


def runs_kernel(dtype, impl: str | None = None) -> bool:
    """Whether ``grouped_matmul`` on non-empty inputs of ``dtype`` runs the Pallas kernel (compiled
    or interpreted) rather than the reference, under ``impl`` (``_dispatch.choose_impl``)."""
    from . import pallas_gpu
    return choose_impl(impl, jnp.dtype(dtype) in pallas_gpu.TRITON_FLOATS) != 'reference'
