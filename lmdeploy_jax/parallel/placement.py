"""Host data onto a mesh, alike in every process of a multi-host mesh.

``jax.make_array_from_callback`` asks each process only for the pieces its own devices hold, so the
loader reads each weight shard straight from the file onto its device, and no process needs
another's data.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def from_host(shape: tuple[int, ...], mesh: Mesh, spec: PartitionSpec,
              read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array of ``shape`` partitioned by ``spec``: ``read(index)`` gives each local shard."""
    return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), read)


def agree_min(value: int) -> int:
    """The smallest ``value`` over all processes: sizes that shape a global array (the KV pool)
    must be the same everywhere, though each host measures its own free memory."""
    if jax.process_count() == 1:
        return value
    return int(np.min(multihost_utils.process_allgather(np.asarray(value, np.int64))))
