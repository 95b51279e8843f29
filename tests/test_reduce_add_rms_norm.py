"""The ``reduce_add_rms_norm`` op (``pallas_kernels/reduce_add_rms_norm``): its reference on the CPU
over simulated devices, against a sum and ``add_rms_norm`` written out; what its CUDA kernel takes;
the kernel refusing a CPU mesh with its reason, and a second engine's claim on GPUs in use; and the
CUDA source compiling with nvcc.

The kernel itself needs two GPUs of one process with peer access: it is checked on the GPU machine
against this reference by ``benchmark/bench_reduce_add_rms_norm.py`` (RESULTS.md), and in the
engine by the tp=2 / tp=4 greedy tokens of ``benchmark/run_tp_decode_variants.sh``.
"""
from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.reduce_add_rms_norm import p2p_cuda
from pallas_kernels.reduce_add_rms_norm.api import prepare_kernel, reduce_add_rms_norm

EPS = 1e-6
ROOT = Path(__file__).resolve().parents[1]

# three simulated devices need their own process (the device count is fixed when jax starts)
SHARDED_CHECK = '''
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pallas_kernels.reduce_add_rms_norm.api import reduce_add_rms_norm
from pallas_kernels.rms_norm.api import add_rms_norm
rng = np.random.default_rng({seed})
mesh = Mesh(np.array(jax.devices()), ('tp',))
partial = jnp.asarray(rng.standard_normal((3, 2, 64)), jnp.float32)
residual = jnp.asarray(rng.standard_normal((2, 64)), jnp.float32)
weights = jnp.asarray(1 + 0.5 * rng.standard_normal((4, 64)), jnp.float32)
op = jax.jit(jax.shard_map(lambda p, r, w: reduce_add_rms_norm(p[0], r, w, {eps}, jnp.int32(2), axis_name='tp'),
                           mesh=mesh, in_specs=(P('tp'), P(), P()), out_specs=(P(), P()), check_vma=False))
s, normed = op(jax.device_put(partial, NamedSharding(mesh, P('tp'))), residual, weights)
want_s, want_normed = add_rms_norm(partial.sum(0), residual, weights[2], {eps})
np.testing.assert_allclose(s, want_s, rtol=1e-6, atol=1e-6)
np.testing.assert_allclose(normed, want_normed, rtol=1e-5, atol=1e-5)
print('ok')
'''


def test_reference_sums_the_devices_partials_then_adds_and_normalises(rng, tmp_path):
    """Three simulated CPU devices, each with its own partial: the sum over them plus the residual,
    and its RMSNorm with layer 2 of stacked weights."""
    code = SHARDED_CHECK.format(seed=int(rng.integers(1 << 31)), eps=EPS)
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=3', PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]


def test_mismatched_residual_is_a_clear_error(rng):
    partial = jnp.asarray(rng.standard_normal((1, 64)), jnp.bfloat16)
    with pytest.raises(ValueError, match='residual must match partial'):
        reduce_add_rms_norm(partial, partial.astype(jnp.float32), jnp.ones(64, jnp.bfloat16), EPS, axis_name='tp')


def test_the_kernel_takes_whole_16_byte_rows_that_fit_its_slots():
    def arrays(shape, dtype=jnp.bfloat16, weight_dtype=None):
        x = jnp.zeros(shape, dtype)
        return x, x, jnp.zeros((2, shape[-1]), weight_dtype or dtype)
    assert p2p_cuda.supports(*arrays((1, 4096)))
    assert p2p_cuda.supports(*arrays((4, 8192)))                       # 64 KB: the slots' size
    assert not p2p_cuda.supports(*arrays((8, 8192)))                   # 128 KB
    assert not p2p_cuda.supports(*arrays((1, 4100)))                   # 8200-byte rows: not whole vectors
    assert not p2p_cuda.supports(*arrays((1, 4096), weight_dtype=jnp.float32))
    assert not p2p_cuda.supports(*arrays((1, 4096), dtype=jnp.int32))


def test_a_cpu_mesh_keeps_the_reference_and_says_why():
    assert prepare_kernel(jax.devices()[:1]) == 'the devices are not GPUs'
    assert not p2p_cuda.is_prepared(jax.devices()[:1])


@pytest.mark.skipif(shutil.which('nvcc') is None, reason='needs nvcc (the GPU machines have it)')
def test_the_cuda_source_compiles(tmp_path, monkeypatch):
    """The library builds against this JAX's FFI headers and exports what ``p2p_cuda`` loads."""
    monkeypatch.setenv('LMDEPLOY_JAX_CACHE', str(tmp_path))
    library = p2p_cuda._build()
    symbols = subprocess.run(['nm', '-D', str(library)], capture_output=True, text=True, check=True).stdout
    assert 'LmdjP2pReduceAddRmsNorm' in symbols and 'lmdj_p2p_init' in symbols
    assert p2p_cuda._build() == library                                # the second call takes the cached build



def test_a_second_engine_on_claimed_gpus_is_refused_until_the_first_lets_go():
    """Two engines' kernels on one GPU could wait on each other for ever, so the second keeps XLA's
    all-reduce; once the first model (holding the claim) is gone, the GPUs are free again."""
    first = p2p_cuda.claim((90, 91))
    assert isinstance(first, p2p_cuda.Claim)
    refused = p2p_cuda.claim((91, 92))
    assert isinstance(refused, str) and 'GPU 91' in refused
    assert isinstance(p2p_cuda.claim((93, 94)), p2p_cuda.Claim)          # other GPUs: free
    del first
    gc.collect()
    assert isinstance(p2p_cuda.claim((91, 92)), p2p_cuda.Claim)
