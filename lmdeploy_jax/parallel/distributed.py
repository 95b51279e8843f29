"""Joining several processes (one per host) into one JAX runtime, so a mesh spans all their devices.

JAX's multi-controller model: every process runs the same program (here: the same engine over the
same requests), ``jax.devices()`` lists the devices of all of them, and collectives cross hosts.
The coordinator is process 0's ``host:port``; settings come from arguments or the environment
variables below, so a launcher only has to export them.
"""
from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger('lmdeploy_jax')

ENV_COORDINATOR = 'LMDEPLOY_JAX_COORDINATOR'         # e.g. 10.0.0.1:12345 (process 0's host)
ENV_NUM_PROCESSES = 'LMDEPLOY_JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'LMDEPLOY_JAX_PROCESS_ID'
ENV_LOCAL_DEVICES = 'LMDEPLOY_JAX_LOCAL_DEVICES'     # optional: comma-separated local device ids


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Call ``jax.distributed.initialize`` once, before anything touches a device; True if this
    process is (now) part of a multi-process runtime. Without a coordinator (argument or
    ``LMDEPLOY_JAX_COORDINATOR``) it does nothing: one process, its own devices."""
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    if not coordinator:
        return False
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    local = os.environ.get(ENV_LOCAL_DEVICES)
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               local_device_ids=[int(i) for i in local.split(',')] if local else None)
    logger.info('jax.distributed: process %d of %d (coordinator %s), %d local / %d global devices',
                jax.process_index(), jax.process_count(), coordinator, jax.local_device_count(),
                jax.device_count())
    return True


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f'{ENV_COORDINATOR} is set, so {name} must be set too')
    return int(value)
