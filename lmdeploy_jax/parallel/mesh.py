"""The device mesh of a ``tp=N`` engine: N devices (of every process, under ``jax.distributed``)."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from .rules import AXES


def make_tp_mesh(tp: int) -> Mesh:
    """A 1-D mesh over the first ``tp`` devices, in JAX's global device order (process by process)."""
    devices = jax.devices()
    if tp > len(devices):
        raise ValueError(f'tp={tp} needs {tp} devices but only {len(devices)} {devices[0].platform} '
                         f'device(s) are present across {jax.process_count()} process(es)')
    if jax.process_count() > 1 and tp != len(devices):
        raise ValueError(f'tp={tp}: with {jax.process_count()} processes the mesh must take all their '
                         f'{len(devices)} devices, so that every process drives a part of it')
    return Mesh(np.asarray(devices[:tp]).reshape(tp), AXES)


def local_devices(mesh: Mesh) -> list[jax.Device]:
    """The mesh's devices this process drives."""
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
