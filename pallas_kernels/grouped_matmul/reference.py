"""XLA reference of the grouped matmul: ``jax.lax.ragged_dot_general``, the op's definition and
what runs off the GPU."""
from __future__ import annotations

import jax


def _dimension_numbers(transpose_rhs: bool) -> jax.lax.RaggedDotDimensionNumbers:
    """lhs ``[M, K]`` against rhs ``[G, K, N]`` (or ``[G, N, K]`` when ``transpose_rhs``): contract
    K, lhs's rows ragged, rhs's first dimension the group."""
    return jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2 if transpose_rhs else 1]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                             transpose_rhs: bool) -> jax.Array:
    """``api.grouped_matmul``'s contract (inputs validated there)."""
    return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, _dimension_numbers(transpose_rhs))
