"""New weights for a running engine (``AsyncEngine.update_weights``): checked against the served
model's parameters in one device's layout and placed where the served ones live (over a
tensor-parallel mesh, the fused projections' rows regrouped shard by shard as the loader lays them
out), so the compiled steps take them unchanged."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from flax.nnx import traversals

from ..models.layers.fused import FusedLayout
from ..models.loader import LoadedModel, abstract_params, flat_state
from ..models.restore import fused_key, regroup_fused


def _flat(params, what: str) -> dict:
    """``params`` (an ``nnx.State`` or a nested dict of arrays) by state path."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    if not isinstance(params, dict):
        raise ValueError(f'{what} must be an nnx.State or a nested dict of arrays, got {type(params).__name__}')
    return traversals.flatten_mapping(params)


def _name(path: tuple) -> str:
    return '/'.join(map(str, path))


def _one_device(model: LoadedModel) -> tuple[dict, FusedLayout | None]:
    """The served parameters' shapes and dtypes in one device's layout, by state path, and the
    layout of the mesh's fused projections (None without a mesh)."""
    if model.mesh is None:
        return _flat(model.params, 'served'), None
    spec = dataclasses.replace(model.spec, num_kv_heads=model.spec.num_kv_heads // model.kv_replicas)
    return flat_state(abstract_params(spec)[1]), FusedLayout(spec, model.mesh.size, model.kv_replicas)


def place_like(params, model: LoadedModel) -> nnx.State:
    """``params`` (an ``nnx.State`` in one device's layout, e.g. ``nnx.state`` of
    ``lmdeploy_jax.load_model``'s module, or its ``nnx.to_pure_dict``; 4-bit AWQ/GPTQ models: their
    packed ``qweight``/``scales``/``zeros``) as a copy of ``model.params`` (the served parameters)
    holding the new values, each placed with the served one's sharding; over a mesh the fused
    projections' rows are regrouped for it (``restore.regroup_fused``). Arrays already placed as the
    served ones are not copied. Raises ValueError naming the paths missing or unknown, or the first
    whose shape or dtype is not the served one's in one device's layout."""
    given, (expected, layout) = _flat(params, 'params'), _one_device(model)
    missing, unknown = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    if missing or unknown:
        names = [_name(p) for p in missing[:3]], [_name(p) for p in unknown[:3]]
        raise ValueError(f'params do not have the served model\'s parameters: missing {names[0]}, unknown {names[1]}')
    for path, old in expected.items():
        shape, dtype = tuple(np.shape(given[path])), getattr(given[path], 'dtype', None)
        if shape != tuple(old.shape) or dtype != old.dtype:
            raise ValueError(f'params/{_name(path)}: {dtype} {shape}, the served parameter is '
                             f'{old.dtype} {tuple(old.shape)}')
    placed = {}
    for path, old in _flat(model.params, 'served').items():
        if layout is not None and fused_key(path):
            placed[path] = regroup_fused(given[path], path, layout, old.sharding)
        else:
            placed[path] = jax.device_put(given[path], old.sharding)
    state = jax.tree.map(lambda x: x, model.params)          # a new State: the served one stays intact
    nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(placed))
    return state
