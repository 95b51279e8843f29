"""Joining several processes (one per host) into one JAX runtime, so a mesh spans all their devices.

JAX's multi-controller model: every process runs the same program (here: the same engine over the
same requests), ``jax.devices()`` lists the devices of all of them, and collectives cross hosts.
The coordinator is process 0's ``host:port``; settings come from arguments or the environment
variables ``LMDEPLOY_JAX_COORDINATOR``, ``_NUM_PROCESSES``, ``_PROCESS_ID`` and ``_LOCAL_DEVICES``
(``settings.py``), so a launcher only has to export them.
"""
from __future__ import annotations

import logging

import jax

from .. import settings

logger = logging.getLogger('lmdeploy_jax')


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Call ``jax.distributed.initialize`` once, before anything touches a device; True if this
    process is (now) part of a multi-process runtime. Without a coordinator (argument or
    ``LMDEPLOY_JAX_COORDINATOR``) it does nothing: one process, its own devices."""
    if jax.distributed.is_initialized():
        return True
    env = settings.current()
    coordinator = coordinator or env.coordinator
    if not coordinator:
        return False
    num_processes = num_processes if num_processes is not None else env.num_processes
    process_id = process_id if process_id is not None else env.process_id
    for name, value in (('LMDEPLOY_JAX_NUM_PROCESSES', num_processes), ('LMDEPLOY_JAX_PROCESS_ID', process_id)):
        if value is None:
            raise ValueError(f'a coordinator ({coordinator}) is set, so {name} (or its argument) must be set too')
    local = list(env.local_devices) if env.local_devices is not None else None
    jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local)
    logger.info('jax.distributed: process %d of %d (coordinator %s), %d local / %d global devices',
                jax.process_index(), jax.process_count(), coordinator, jax.local_device_count(),
                jax.device_count())
    return True

