"""The op the models call inside ``shard_map`` after a row-parallel projection: picks the CUDA
kernel where it is prepared for the mesh's devices and takes the inputs, the reference otherwise."""
from __future__ import annotations

import jax

from .._checks import require, stacked_weight
from . import p2p_cuda
from .reference import reduce_add_rms_norm_reference

KERNEL_MAX_BYTES = p2p_cuda.MAX_BYTES     # the largest ``partial`` (per device) the CUDA kernel takes


def prepare_kernel(devices) -> p2p_cuda.Claim | str:
    """Make the CUDA kernel ready for ``devices`` (a mesh's GPUs, in axis order): a claim on them to
    keep while using it, else why not (not GPUs, several processes, no nvcc, no peer access, another
    engine's claim)."""
    return p2p_cuda.prepare(devices)


def reduce_add_rms_norm(partial: jax.Array, residual: jax.Array, weight: jax.Array, eps: float,
                        layer: jax.Array | int | None = None, *, axis_name: str,
                        devices=None) -> tuple[jax.Array, jax.Array]:
    """``(s, rms_norm(s, weight, eps, layer))`` for ``s = residual + psum(partial, axis_name)``, in
    ``partial``'s dtype; each device's ``partial [..., hidden]`` is its share of a row-parallel
    projection's output. ``weight``/``layer`` as in ``rms_norm.api.rms_norm``. ``devices``: the
    mesh's devices in the order of ``axis_name`` (the mesh's only axis); with them, the CUDA kernel
    runs if ``prepare_kernel`` made it ready for them and it takes these inputs."""
    require(residual.shape == partial.shape and residual.dtype == partial.dtype,
            f'residual must match partial {partial.dtype} {tuple(partial.shape)}, '
            f'got {residual.dtype} {tuple(residual.shape)}')
    weight, layer = stacked_weight(weight, layer, partial.shape[-1])
    if devices is not None and p2p_cuda.is_prepared(devices) and p2p_cuda.supports(partial, residual, weight):
        return p2p_cuda.reduce_add_rms_norm_p2p(partial, residual, weight, layer, eps, p2p_cuda.device_key(devices))
    return reduce_add_rms_norm_reference(partial, residual, weight, eps, layer, axis_name)
