"""New weights for a running engine (``AsyncEngine.update_weights``): checked against the served
parameters and placed where they live, so the compiled steps take them unchanged."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from flax.nnx import traversals


def _flat(params, what: str) -> dict:
    """``params`` (an ``nnx.State`` or a nested dict of arrays) by state path."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    if not isinstance(params, dict):
        raise ValueError(f'{what} must be an nnx.State or a nested dict of arrays, got {type(params).__name__}')
    return traversals.flatten_mapping(params)


def place_like(params, served: nnx.State) -> nnx.State:
    """``params`` (an ``nnx.State``, e.g. ``nnx.state`` of ``lmdeploy_jax.load_model``'s module, or
    its ``nnx.to_pure_dict``) as a copy of ``served`` (the engine's parameters) holding the new
    values, each placed with the served one's sharding. Raises ValueError naming the paths missing
    or unknown, or the first whose shape or dtype is not the served one's."""
    given, current = _flat(params, 'params'), _flat(served, 'served')
    missing, unknown = sorted(current.keys() - given.keys()), sorted(given.keys() - current.keys())
    if missing or unknown:
        names = ['/'.join(map(str, p)) for p in missing[:3]], ['/'.join(map(str, p)) for p in unknown[:3]]
        raise ValueError(f'params do not have the served model\'s parameters: missing {names[0]}, unknown {names[1]}')
    placed = {}
    for path, old in current.items():
        new = given[path]
        shape, dtype = tuple(np.shape(new)), getattr(new, 'dtype', None)
        if shape != old.shape or dtype != old.dtype:
            raise ValueError(f'params/{"/".join(map(str, path))}: {dtype} {shape}, the served parameter is '
                             f'{old.dtype} {tuple(old.shape)}')
        placed[path] = jax.device_put(new, old.sharding)
    state = jax.tree.map(lambda x: x, served)          # a new State: the served one stays intact
    nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(placed))
    return state
