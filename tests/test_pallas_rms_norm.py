"""The RMSNorm kernels (``pallas_kernels/rms_norm/pallas_gpu.py``: ``rms_norm`` and ``add_rms_norm``)
against their XLA reference.

Hidden sizes that are not powers of two (the kernel masks its tile's tail), row counts that leave a
program's last rows masked, stacked per-layer weights, dtype promotion, the sizes the kernel takes,
and its CUDA lowering. The harness (interpret mode or the GPU) is ``pallas_cases``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_cases import INTERPRET, KERNEL, TOLERANCE, assert_kernels_alone, lower_for_cuda, relative_error

from pallas_kernels.rms_norm import pallas_gpu as norm_gpu
from pallas_kernels.rms_norm.api import add_rms_norm, rms_norm
from pallas_kernels.rms_norm.reference import rms_norm_reference

NORM_EPS = 1e-5


def norm_case(rng, shape, dtype, weight_dtype=None):
    """Random ``x`` whose rows have scales from 0.01 to 10 (eps matters for the small ones), and a
    random weight around 1 of ``weight_dtype`` (default: x's)."""
    scales = 10.0 ** rng.uniform(-2, 1, (*shape[:-1], 1))
    x = jnp.asarray(rng.standard_normal(shape) * scales, dtype)
    return x, jnp.asarray(1 + 0.5 * rng.standard_normal(shape[-1]), weight_dtype or dtype)


def assert_norm_matches(out, x, weight, dtype):
    """Close to the reference (interpret mode starts the output as NaN: an element the kernel
    never writes fails), with the reference's shape and dtype."""
    ref = rms_norm(x, weight, NORM_EPS, impl='reference')
    assert out.shape == ref.shape and out.dtype == ref.dtype == dtype
    ours = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(ours).any(), 'the kernel left an output element unwritten'
    assert relative_error(ours, ref.astype(jnp.float32)) < TOLERANCE[dtype]


@pytest.mark.parametrize('shape,dtype', [((1, 576), jnp.float32), ((1, 576), jnp.bfloat16),
                                         ((3, 5, 96), jnp.float16), ((300, 576), jnp.bfloat16),
                                         ((2, 100, 128), jnp.float32), ((7, 3584), jnp.float16)])
def test_rms_norm_matches_reference(rng, shape, dtype):
    """Through the op's API with its default launch, in the kernel's three dtypes: hidden sizes
    that are not powers of two (96, 576, 3584: a masked tile tail) and one that is; ``[N, hidden]``
    and ``[B, T, hidden]``; one row (a batch-1 decode step) and hundreds (several rows per
    program, the last partly masked)."""
    x, weight = norm_case(rng, shape, dtype)
    assert_norm_matches(rms_norm(x, weight, NORM_EPS, impl=KERNEL), x, weight, dtype)


@pytest.mark.parametrize('tile_elems,num_warps', [(128, 2), (256, None), (8192, 8)])
def test_rms_norm_launch_configs(rng, tile_elems, num_warps):
    """Tiles smaller than one padded row (one row per program), of two rows, or of many; 37 rows
    leave the last program's rows partly past the end."""
    x, weight = norm_case(rng, (37, 96), jnp.bfloat16)
    config = norm_gpu.NormConfig(tile_elems=tile_elems, num_warps=num_warps)
    out = norm_gpu.rms_norm_pallas(x, weight[None], jnp.int32(0), NORM_EPS, config=config, interpret=INTERPRET)
    assert_norm_matches(out, x, weight, jnp.bfloat16)


@pytest.mark.parametrize('layer', [0, 2])
def test_rms_norm_reads_its_layer_of_stacked_weights(rng, layer):
    """Every layer's weights stacked ``[layers, hidden]`` plus the layer (as in the models' layer
    loop): the kernel scales by that layer's row, the first and one further in, not the first."""
    x, _ = norm_case(rng, (5, 96), jnp.bfloat16)
    stack = jnp.asarray(1 + 0.5 * rng.standard_normal((3, 96)), jnp.bfloat16)
    out = rms_norm(x, stack, NORM_EPS, jnp.int32(layer), impl=KERNEL)
    assert_norm_matches(out, x, stack[layer], jnp.bfloat16)
    assert relative_error(out.astype(jnp.float32), rms_norm(x, stack[layer - 1], NORM_EPS).astype(jnp.float32)) > 0.1


def test_rms_norm_promotes_like_the_reference(rng):
    """A float32 weight on bfloat16 ``x``: normalised in bfloat16, then scaled in float32."""
    x, weight = norm_case(rng, (4, 3, 160), jnp.bfloat16, jnp.float32)
    assert_norm_matches(rms_norm(x, weight, NORM_EPS, impl=KERNEL), x, weight, jnp.float32)


def test_rms_norm_supports_rows_up_to_max_hidden(monkeypatch):
    """Wider rows, float64 and empty inputs take the reference (an error if the kernel is named)."""
    monkeypatch.delenv('LMDEPLOY_JAX_KERNELS', raising=False)
    wide = jnp.ones((2, norm_gpu.MAX_HIDDEN * 2), jnp.float32)
    assert norm_gpu.supports(wide[:, :norm_gpu.MAX_HIDDEN], wide[0, :norm_gpu.MAX_HIDDEN])
    assert not norm_gpu.supports(wide, wide[0])
    assert not norm_gpu.supports(jnp.ones((0, 64), jnp.float32), jnp.ones((64,), jnp.float32))
    np.testing.assert_array_equal(rms_norm(wide, wide[0], NORM_EPS), rms_norm_reference(wide, wide[0], NORM_EPS))
    with pytest.raises(ValueError, match='does not support'):
        rms_norm(wide, wide[0], NORM_EPS, impl=KERNEL)


@pytest.mark.parametrize('shape,dtype', [((1, 1, 576), jnp.bfloat16), ((37, 96), jnp.float32),
                                         ((2, 50, 128), jnp.bfloat16)])
def test_add_rms_norm_returns_the_sum_and_its_norm(rng, shape, dtype):
    """The residual add and the norm after it as one kernel: the sum exactly as ``x + residual``
    in ``x``'s dtype (the residual stream the next layer adds to), the norm as the reference's
    of that sum; one row (batch-1 decode) and many, stacked weights read at a layer."""
    x, _ = norm_case(rng, shape, dtype)
    residual, _ = norm_case(rng, shape, dtype)
    stack = jnp.asarray(1 + 0.5 * rng.standard_normal((3, shape[-1])), dtype)
    total, normed = add_rms_norm(x, residual, stack, NORM_EPS, jnp.int32(2), impl=KERNEL)
    want_total, want_normed = add_rms_norm(x, residual, stack, NORM_EPS, jnp.int32(2), impl='reference')
    assert total.dtype == dtype and total.shape == x.shape
    np.testing.assert_array_equal(np.asarray(total.astype(jnp.float32)), np.asarray((x + residual).astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(want_total), np.asarray(total))
    assert_norm_matches(normed, want_total, stack[2], dtype)
    assert relative_error(normed.astype(jnp.float32), want_normed.astype(jnp.float32)) < TOLERANCE[dtype]


def test_add_rms_norm_refuses_a_residual_unlike_x(rng):
    x, weight = norm_case(rng, (2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r'residual must match x bfloat16 \(2, 64\), got float32'):
        add_rms_norm(x, x.astype(jnp.float32), weight, NORM_EPS)


@pytest.mark.parametrize('shape', [(1, 1, 4096), (3, 17, 3584)])
def test_rms_norm_lowers_to_its_kernel_alone(shape):
    """A decode step's norm ``[B=1, T=1, 4096]`` and a prefill's of a hidden size that is not a
    power of two, each reading its layer of stacked weights as in the models' layer loop, lowered
    for CUDA (Triton IR, checked without a GPU): one launch and free reshapes, nothing XLA must
    launch (no slice of the weights); the same for ``add_rms_norm``."""
    x, stack = jax.ShapeDtypeStruct(shape, jnp.bfloat16), jax.ShapeDtypeStruct((4, shape[-1]), jnp.bfloat16)
    layer = jax.ShapeDtypeStruct((), jnp.int32)
    assert_kernels_alone(lower_for_cuda(lambda x, w, i: rms_norm(x, w, NORM_EPS, i, impl='pallas'), x, stack, layer),
                         launches=1)
    assert_kernels_alone(lower_for_cuda(lambda x, w, i: add_rms_norm(x, x, w, NORM_EPS, i, impl='pallas'),
                                        x, stack, layer), launches=1)
