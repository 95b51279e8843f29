"""The CUDA implementation (``p2p_cuda.cu``): a one-shot all-reduce over peer memory fused with the
residual add and RMSNorm, as an XLA FFI custom call that XLA may record into its command buffers.

CUDA, not Pallas: the all-reduce has to reach the other GPUs' memory from inside a CUDA graph,
which neither Pallas lowering offers in one process (Mosaic GPU's remote references are not
supported single-process; Triton has no peer pointers) and which XLA's one-shot all-reduce
kernel does not do inside its command buffers.

The library is compiled with ``nvcc`` on first use (cached under ``LMDEPLOY_JAX_CACHE``, keyed by
the source, the GPU architecture, JAX's version and nvcc's), so a machine without nvcc, without
peer access between its GPUs or running several processes keeps XLA's all-reduce, as does a second
engine on GPUs another one sums over (``Claim``); ``prepare`` says why."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

import jax
import numpy as np

from lmdeploy_jax.settings import current as current_settings

SOURCE = Path(__file__).with_name('p2p_cuda.cu')
TARGET = 'lmdeploy_jax_p2p_reduce_add_rms_norm'
MAX_BYTES = 64 * 1024          # per call and rank: 4 rows of hidden 8192 in bfloat16
MAX_ROW_BYTES = 4 * 512 * 16   # a row is at most 4 16-byte vectors for each of the kernel's 512 threads
FLOATS = (jax.numpy.bfloat16, jax.numpy.float16, jax.numpy.float32)
_prepared: set[str] = set()
_claims: dict[int, weakref.ref] = {}      # CUDA ordinal -> the live Claim on it


class Claim:
    """Held by the one model that sums over some GPUs with the kernel, for as long as it lives. The
    kernel's calls must reach every GPU of a set in the same order; two engines driving the same
    GPUs from two threads would not keep that, and their kernels could wait on each other for ever."""

    def __init__(self, ordinals: tuple[int, ...]):
        self.ordinals = ordinals


def claim(ordinals: tuple[int, ...]) -> Claim | str:
    """A ``Claim`` on ``ordinals``, or why not: one of them is claimed by a live ``Claim``."""
    for ordinal in ordinals:
        held = _claims.get(ordinal)
        if held is not None and held() is not None:
            return (f"GPU {ordinal} is already summed over by another engine in this process (two engines' "
                    f"kernels could wait on each other)")
    new = Claim(tuple(ordinals))
    _claims.update({ordinal: weakref.ref(new) for ordinal in ordinals})
    return new


def _ordinals(devices) -> tuple[int, ...]:
    return tuple(d.local_hardware_id for d in devices)


def device_key(devices) -> str:
    """The CUDA ordinals of ``devices`` in rank order, as the kernel's ``devices`` attribute names
    its communicator: the same in every process that uses these GPUs (so stored executables hold)."""
    return ','.join(map(str, _ordinals(devices)))


def prepare(devices) -> Claim | str:
    """Build and load the library, register the custom call and allocate the mailboxes for
    ``devices`` (a mesh's, in axis order). A ``Claim`` on them when the kernel is ready (keep it
    while using the kernel), else why it is not."""
    if any(d.platform != 'gpu' for d in devices):
        return 'the devices are not GPUs'
    if jax.process_count() > 1:
        return 'the mesh spans several processes (peer memory is per process)'
    key, ordinals = device_key(devices), _ordinals(devices)
    if key in _prepared:
        return claim(ordinals)
    try:
        library = _library(_architecture(devices[0]))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        return f'the CUDA kernel could not be built: {e}'
    error = ctypes.create_string_buffer(512)
    if library.lmdj_p2p_init(len(devices), (ctypes.c_int * len(devices))(*ordinals), ctypes.c_size_t(MAX_BYTES),
                             error, len(error)) != 0:
        return error.value.decode()
    _prepared.add(key)
    return claim(ordinals)


def is_prepared(devices) -> bool:
    return device_key(devices) in _prepared


def supports(partial, residual, weight) -> bool:
    """Same-dtype float inputs whose rows are whole 16-byte vectors, at most ``MAX_ROW_BYTES``, and
    whose payload fits a mailbox slot."""
    row_bytes = partial.shape[-1] * partial.dtype.itemsize
    return (partial.dtype in FLOATS and residual.dtype == partial.dtype and weight.dtype == partial.dtype
            and 0 < partial.size * partial.dtype.itemsize <= MAX_BYTES and row_bytes % 16 == 0
            and row_bytes <= MAX_ROW_BYTES)


def reduce_add_rms_norm_p2p(partial, residual, weight, layer, eps: float, devices_key: str):
    """Inside ``shard_map``: ``(residual + sum of partial over the ranks, its RMSNorm)`` (contract of
    ``api.reduce_add_rms_norm``; ``weight [layers, hidden]``, ``layer`` an int32 scalar)."""
    out = jax.ShapeDtypeStruct(partial.shape, partial.dtype)
    return jax.ffi.ffi_call(TARGET, (out, out))(partial, residual, weight, layer.reshape(1),
                                                devices=devices_key, eps=np.float32(eps))


def _architecture(device) -> str:
    """nvcc's name of the device's architecture, e.g. ``sm_90`` for compute capability 9.0."""
    return 'sm_' + str(getattr(device, 'compute_capability', '9.0')).replace('.', '')


@functools.cache
def _library(architecture: str) -> ctypes.CDLL:
    library = ctypes.CDLL(str(_build(architecture)))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.LmdjP2pReduceAddRmsNorm), platform='CUDA')
    library.lmdj_p2p_init.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_size_t, ctypes.c_char_p,
                                      ctypes.c_size_t]
    return library


def _build(architecture: str = 'sm_90') -> Path:
    """The library compiled for ``architecture``, from the cache or built now (written under a
    temporary name, then renamed, so concurrent builds never load a half-written file)."""
    env = current_settings()
    nvcc = shutil.which('nvcc') or os.path.join(env.cuda_home, 'bin', 'nvcc')
    if not os.path.exists(nvcc):
        raise RuntimeError('nvcc not found (set CUDA_HOME or put nvcc on PATH)')
    version = subprocess.run([nvcc, '--version'], capture_output=True, text=True, check=True).stdout
    key = SOURCE.read_bytes() + f'{jax.__version__} {architecture} {version}'.encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    cache = Path(env.cache_dir) / 'kernels'
    library = cache / f'p2p_cuda-{digest}.so'
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        built = Path(work) / library.name
        result = subprocess.run([nvcc, '-O3', '-std=c++17', '-shared', '-Xcompiler', '-fPIC', f'-arch={architecture}',
                                 f'-I{jax.ffi.include_dir()}', str(SOURCE), '-o', str(built)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f'nvcc failed: {result.stderr.strip()[-2000:]}')
        os.replace(built, library)
    return library
