"""The grouped matmul kernel (``pallas_kernels/grouped_matmul``) interpreted on the CPU (compiled on
the GPU under ``LMDEPLOY_JAX_KERNELS=pallas``) against a float64 numpy product group by group and
against the XLA reference (``jax.lax.ragged_dot_general``), on fresh random inputs: ragged sizes
with empty groups, one group taking every row, sizes summing short of the rows (the rest zeros),
row counts that are not a multiple of the tile, both weight layouts, float32 and bfloat16, rows
gathered through ``lhs_rows`` and stored through ``out_rows`` as the MoE layer sorts its tokens'
choices by expert and back. The
tile plan covers each row exactly once and never visits an empty group; the kernel compiles for
sm_90 within its shared memory."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_cases import KERNEL, SM90_SHARED_BYTES, TOLERANCE, compile_for_sm90

from pallas_kernels.grouped_matmul.api import grouped_matmul
from pallas_kernels.grouped_matmul.pallas_gpu import block_m_for, max_items, tile_plan


def _expected(x: np.ndarray, w: np.ndarray, sizes, transpose_rhs: bool) -> np.ndarray:
    """Each group's rows times its weights in float64; rows past the sizes' sum zeros."""
    out = np.zeros((x.shape[0], w.shape[1] if transpose_rhs else w.shape[2]))
    start = 0
    for g, size in enumerate(sizes):
        wg = w[g].astype(np.float64)
        out[start:start + size] = x[start:start + size].astype(np.float64) @ (wg.T if transpose_rhs else wg)
        start += size
    return out


def _random_sizes(rng, rows: int, groups: int, empty: int) -> list[int]:
    """Sizes of ``groups`` groups summing to ``rows``, ``empty`` of them (at random places) zero."""
    full = rng.choice(groups, groups - empty, replace=False)
    cuts = np.sort(rng.integers(0, rows + 1, len(full) - 1))
    sizes = np.zeros(groups, int)
    sizes[full] = np.diff(np.concatenate([[0], cuts, [rows]]))
    return sizes.tolist()


# (rows, K, N, sizes, transpose_rhs, dtype): None sizes are drawn at random with 3 of 8 groups empty
CASES = [
    (77, 48, 40, None, True, jnp.float32),              # ragged, empty groups; 77 rows: not a multiple of a tile
    (77, 48, 40, None, False, jnp.bfloat16),
    (77, 48, 40, [0, 0, 77, 0], True, jnp.bfloat16),     # one group takes every row
    (77, 48, 40, [77, 0, 0, 0], False, jnp.float32),
    (50, 40, 24, [3, 0, 20, 10], True, jnp.float32),     # the sizes sum to 33 of the 50 rows: the rest are zeros
    (6, 64, 32, [1, 0, 1, 1, 2, 0, 1], True, jnp.bfloat16),    # a decode step: groups of one or two rows
]


@pytest.mark.parametrize('rows, K, N, sizes, transpose_rhs, dtype', CASES)
def test_kernel_matches_the_groups_products(rows, K, N, sizes, transpose_rhs, dtype):
    rng = np.random.default_rng()
    sizes = _random_sizes(rng, rows, 8, 3) if sizes is None else sizes
    x = jnp.asarray(rng.standard_normal((rows, K)), dtype)
    w = jnp.asarray(rng.standard_normal((len(sizes), N, K) if transpose_rhs else (len(sizes), K, N)), dtype)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    ours = grouped_matmul(x, w, group_sizes, transpose_rhs=transpose_rhs, impl=KERNEL)
    reference = grouped_matmul(x, w, group_sizes, transpose_rhs=transpose_rhs, impl='reference')
    assert ours.dtype == dtype and ours.shape == reference.shape == (rows, N)
    expected = _expected(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes, transpose_rhs)
    scale = np.abs(expected).max()
    for got in (ours, reference):
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=TOLERANCE[dtype] * scale, rtol=0)
    assert np.all(np.asarray(ours)[sum(sizes):] == 0)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_kernel_gathers_and_scatters_the_rows_named_by_lhs_rows_and_out_rows(dtype):
    """13 tokens each choosing 3 of 6 experts (one expert chosen by none), the 39 choices sorted
    by expert as the MoE layer sorts them: ``lhs_rows`` names each sorted row's token, and
    ``out_rows`` (the sort's order) puts each product back at its choice. The weights are three
    layers' stacked, the last used (``layer``), as the MoE layer passes them."""
    rng = np.random.default_rng()
    tokens, k, E, K, N = 13, 3, 6, 40, 24
    experts = np.stack([rng.choice(E - 1, k, replace=False) for _ in range(tokens)]).reshape(-1)
    order = np.argsort(experts, kind='stable')
    sizes = jnp.asarray(np.bincount(experts, minlength=E), jnp.int32)
    x = jnp.asarray(rng.standard_normal((tokens, K)), dtype)
    w = jnp.asarray(rng.standard_normal((3, E, N, K)), dtype)
    rows, out_rows = jnp.asarray(order // k, jnp.int32), jnp.asarray(order, jnp.int32)
    expected = _expected(np.asarray(x, np.float32)[order // k], np.asarray(w[2], np.float32), sizes.tolist(), True)
    atol = TOLERANCE[dtype] * np.abs(expected).max()
    for impl in (KERNEL, 'reference'):
        sorted_ = grouped_matmul(x, w, sizes, jnp.int32(2), lhs_rows=rows, transpose_rhs=True, impl=impl)
        by_choice = grouped_matmul(x, w, sizes, jnp.int32(2), lhs_rows=rows, out_rows=out_rows, transpose_rhs=True,
                                   impl=impl)
        assert sorted_.shape == by_choice.shape == (tokens * k, N)
        np.testing.assert_allclose(np.asarray(sorted_, np.float64), expected, atol=atol, rtol=0)
        np.testing.assert_allclose(np.asarray(by_choice, np.float64)[order], expected, atol=atol, rtol=0)


@pytest.mark.parametrize('sizes', [[0, 5, 0, 40, 19], [64, 0, 0, 0, 0], [0] * 5, [1, 1, 1, 1, 1]])
def test_tile_plan_covers_each_row_once_and_skips_empty_groups(sizes):
    """Every row of ``[0, rows)`` falls in exactly one item's tile, that of its group (or of the
    tail past the sizes' sum); no item belongs to an empty group; unused slots cover no row."""
    rows, block_m = 70, 16
    groups = len(sizes)
    group, first, end = (np.asarray(a) for a in tile_plan(jnp.asarray(sizes, jnp.int32), rows, block_m))
    assert len(group) == max_items(rows, groups, block_m)
    owner = np.full(rows, -1)
    for g, f, e in zip(group, first, end):
        covered = np.arange(f, min(f + block_m, e))
        assert g <= groups + 1 and (g > groups) == (len(covered) == 0)
        assert np.all(owner[covered] == -1)
        owner[covered] = g
    starts = np.cumsum([0] + sizes)
    expected = np.full(rows, groups)                   # the tail
    for g in range(groups):
        expected[starts[g]:starts[g + 1]] = g
    np.testing.assert_array_equal(owner, expected)
    assert not set(group[group < groups]) & {g for g, s in enumerate(sizes) if s == 0}


def test_block_rows_follow_the_rows_per_group():
    assert block_m_for(8, 128) == 16 and block_m_for(100, 4) == 32 and block_m_for(32768, 128) == 64


def test_bad_inputs_are_named():
    x, w = jnp.ones((4, 8)), jnp.ones((2, 8, 3))
    with pytest.raises(ValueError, match='group_sizes must be int32'):
        grouped_matmul(x, w, jnp.ones((2,), jnp.float32))
    with pytest.raises(ValueError, match=r'group_sizes must have shape \(2,\)'):
        grouped_matmul(x, w, jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match=r'rhs must be \[G, N, K\] or layer-stacked \[layers, \*\[G, N, K\]\] '
                                         r'with K = 8'):
        grouped_matmul(x, w, jnp.ones((2,), jnp.int32), transpose_rhs=True)
    with pytest.raises(ValueError, match='rhs dtype bfloat16 does not match lhs dtype float32'):
        grouped_matmul(x, w.astype(jnp.bfloat16), jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match=r'layer-stacked rhs \[layers, \*\[G, K, N\]\] need the layer to use'):
        grouped_matmul(x, w[None], jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match='lhs_rows must be int32'):
        grouped_matmul(x, w, jnp.ones((2,), jnp.int32), lhs_rows=jnp.zeros((6,), jnp.float32))
    with pytest.raises(ValueError, match=r'out_rows must have shape \(6,\)'):
        grouped_matmul(x, w, jnp.ones((2,), jnp.int32), lhs_rows=jnp.zeros((6,), jnp.int32),
                       out_rows=jnp.arange(4, dtype=jnp.int32))


@pytest.mark.parametrize('dtype, rows', [(jnp.bfloat16, 8), (jnp.bfloat16, 4096), (jnp.float32, 4096)])
def test_kernel_fits_sm90(monkeypatch, tmp_path, dtype, rows):
    """Qwen3-30B-A3B's gate/up shapes (48 layers of 128 experts, 2048 -> 1536, 8 choices per
    token, rows gathered by ``lhs_rows`` and stored by ``out_rows``) compile for sm_90 within its
    shared memory per block, at a decode step's rows and a prefill's. The layer-stacked weights
    are more than 2**32 bytes (the lowering then addresses them in 64 bits)."""
    shape = jax.ShapeDtypeStruct
    args = (shape((rows // 8, 2048), dtype), shape((48, 128, 1536, 2048), dtype), shape((128,), jnp.int32),
            shape((), jnp.int32), shape((rows,), jnp.int32))
    _, shared = compile_for_sm90(monkeypatch, tmp_path, lambda x, w, s, i, r: grouped_matmul(
        x, w, s, i, lhs_rows=r, out_rows=r, transpose_rhs=True, impl='pallas'), *args)
    assert shared and max(shared.values()) <= SM90_SHARED_BYTES, shared
