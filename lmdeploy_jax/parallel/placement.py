"""Putting host data on a mesh so that every process of a multi-host mesh can do it alike.

``jax.device_put`` of a numpy array onto devices of other processes is not allowed under
``jax.distributed``; ``jax.make_array_from_callback`` asks each process only for the pieces its
own devices hold, which also lets the loader read each weight shard straight from the file onto
its device.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .rules import REPLICATED


def from_host(shape: tuple[int, ...], mesh: Mesh, spec: PartitionSpec,
              read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array of ``shape`` partitioned by ``spec``: ``read(index)`` gives each local shard."""
    return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), read)


def put_replicated(tree, mesh: Mesh):
    """Every array of ``tree`` (numpy, identical in every process) replicated on all mesh devices."""
    sharding = NamedSharding(mesh, REPLICATED)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: x[idx]), tree)


def agree_min(value: int) -> int:
    """The smallest ``value`` over all processes: sizes that shape a global array (the KV pool)
    must be the same everywhere, though each host measures its own free memory."""
    if jax.process_count() == 1:
        return value
    return int(np.min(multihost_utils.process_allgather(np.asarray(value, np.int64))))
