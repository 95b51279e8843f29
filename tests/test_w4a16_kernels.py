"""The W4A16 matmul (pallas_kernels/w4a16) on fresh random codes, zeros, scales and activations:
the tile layout's round trip, the XLA reference against numpy's dequantize-then-matmul (with
K no multiple of 128 too), the Pallas kernel (interpreted on the
CPU; compiled with LMDEPLOY_JAX_KERNELS=pallas) against the reference at decode and prefill
launches, odd group counts and M not a multiple of the M tile, and the kernel compiled by Triton
for sm_90 within its shared memory."""
import jax.numpy as jnp
import numpy as np
import pytest

from lmdeploy_jax.checkpoint.awq_packing import dequantize
from pallas_cases import KERNEL, SM90_SHARED_BYTES, TOLERANCE, compile_for_sm90
from pallas_kernels.w4a16.api import w4a16_matmul
from pallas_kernels.w4a16.layout import pack_codes, unpack_codes
from pallas_kernels.w4a16.pallas_gpu import W4Config, config_for


def random_case(rng, m, k, n, group, dtype=jnp.float32):
    """(x, qweight, scales, zeros) as device arrays and the float32 weight they stand for."""
    codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
    zeros = rng.integers(0, 16, (k // group, n), dtype=np.uint8)
    scales = rng.uniform(0.005, 0.05, (k // group, n)).astype(np.float16)
    x = rng.standard_normal((m, k)).astype(np.float32)
    args = (jnp.asarray(x, dtype), jnp.asarray(pack_codes(codes)), jnp.asarray(scales), jnp.asarray(zeros, jnp.float16))
    return args, dequantize(codes, zeros, scales)


@pytest.mark.parametrize('k', [256, 576, 40])
def test_layout_round_trip(k):
    """Tiles of 128 rows, and of 64 and 8 where K is no multiple of 128 (SmolLM2's 576)."""
    codes = np.random.default_rng().integers(0, 16, (k, 24), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(unpack_codes(jnp.asarray(pack_codes(codes)))), codes)


@pytest.mark.parametrize('m,k,n,group', [(3, 384, 48, 128), (1, 256, 32, 64), (2, 192, 16, 64)])
def test_reference_matches_numpy(m, k, n, group):
    args, weight = random_case(np.random.default_rng(), m, k, n, group)
    got = np.asarray(w4a16_matmul(*args, impl='reference'))
    np.testing.assert_allclose(got, np.asarray(args[0]) @ weight, rtol=1e-5, atol=1e-5)


# (M, K, N, group, config): decode launches with K split (3 and 6 groups: odd counts), a prefill
# launch with M past one M tile and not a multiple of it, and a group wider than a K tile.
CASES = [(5, 384, 48, 128, None, jnp.bfloat16), (2, 384, 32, 64, W4Config(16, 16, 3), jnp.float32),
         (70, 256, 64, 64, W4Config(64, 32, 1), jnp.bfloat16), (9, 512, 32, 256, W4Config(16, 32, 2), jnp.float32)]


@pytest.mark.parametrize('m,k,n,group,config,dtype', CASES)
def test_kernel_matches_reference(m, k, n, group, config, dtype):
    args, _ = random_case(np.random.default_rng(), m, k, n, group, dtype)
    want = np.asarray(w4a16_matmul(*args, impl='reference'), np.float32)
    got = np.asarray(w4a16_matmul(*args, impl=KERNEL, config=config), np.float32)
    tol = TOLERANCE[dtype] * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=TOLERANCE[dtype], atol=tol)


def test_leading_axes_and_bad_shapes():
    rng = np.random.default_rng()
    (x, qweight, scales, zeros), weight = random_case(rng, 6, 256, 32, 128)
    got = w4a16_matmul(x.reshape(2, 3, 256), qweight, scales, zeros, impl=KERNEL)
    np.testing.assert_allclose(np.asarray(got).reshape(6, 32), np.asarray(x) @ weight, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='x has 128 columns'):
        w4a16_matmul(x[:, :128], qweight, scales, zeros)
    with pytest.raises(ValueError, match='scales .* and zeros'):
        w4a16_matmul(x, qweight, scales[:, :16], zeros)


@pytest.mark.parametrize('m', [1, 512])
def test_compiles_for_sm90_within_shared_memory(monkeypatch, tmp_path, m):
    """The llama3-8b gate_up shape at a decode and a prefill launch, in bfloat16."""
    k, n, group = 4096, 2 * 14336, 128
    x = jnp.zeros((m, k), jnp.bfloat16)
    qweight = jnp.zeros((k // 8, n), jnp.int32)
    scales = jnp.zeros((k // group, n), jnp.float16)
    fn = lambda *a: w4a16_matmul(*a, impl='pallas', config=config_for(m, n, k))  # noqa: E731
    _, shared = compile_for_sm90(monkeypatch, tmp_path, fn, x, qweight, scales, scales)
    assert shared and all(0 < b <= SM90_SHARED_BYTES for b in shared.values()), shared
