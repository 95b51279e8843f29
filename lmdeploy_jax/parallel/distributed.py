"""Joining several processes (one per host) into one JAX runtime, so a mesh spans all their devices.

JAX's multi-controller model: every process runs the same program (here: the same engine over the
same requests), ``jax.devices()`` lists the devices of all of them, and collectives cross hosts.
The engine calls ``init_distributed`` with ``TurbomindEngineConfig``'s ``dist_init_addr``,
``nnodes``, ``node_rank`` and ``devices`` (LMDeploy's names; the CLI's ``--dist-init-addr``,
``--nnodes``, ``--node-rank``, ``--devices``).
"""
from __future__ import annotations

import logging

import jax

logger = logging.getLogger('lmdeploy_jax')


def init_distributed(dist_init_addr: str | None = None, nnodes: int = 1, node_rank: int = 0,
                     devices: list[int] | None = None) -> bool:
    """Call ``jax.distributed.initialize`` once, before anything touches a device: process
    ``node_rank`` of ``nnodes``, coordinated by process 0 at ``dist_init_addr`` ('host:port'),
    using the host's ``devices`` (ids; None: all). Returns True if this process is (now) part of a
    multi-process runtime. Without an address it does nothing (one process, its own devices);
    ValueError when ``nnodes > 1`` comes without one. The values are checked by the config."""
    if jax.distributed.is_initialized():
        return True
    if dist_init_addr is None:
        if nnodes > 1:
            raise ValueError(f"nnodes={nnodes} needs dist_init_addr, the 'host:port' of node 0")
        return False
    jax.distributed.initialize(dist_init_addr, nnodes, node_rank,
                               local_device_ids=list(devices) if devices is not None else None)
    logger.info('jax.distributed: process %d of %d (coordinator %s), %d local / %d global devices',
                jax.process_index(), jax.process_count(), dist_init_addr, jax.local_device_count(),
                jax.device_count())
    return True
