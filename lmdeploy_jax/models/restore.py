"""An engine checkpoint (``checkpoint/engine_checkpoint.py``, written by ``lmdeploy_jax convert``)
restored with Orbax straight onto the device, or into the shardings of a tensor-parallel mesh of any
size. The checkpoint holds the parameters as one device does (``FusedLayout`` at tp=1); a fused
projection's rows are regrouped shard by shard for the mesh (KV heads repeated where tp exceeds
them) by one gather compiled with the target sharding as its output, so each device receives only
its own rows."""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from ..checkpoint.engine_checkpoint import PARAMS_DIR, EngineCheckpointInfo, read_info
from ..checkpoint.errors import CheckpointError
from ..checkpoint.source import ModelSource
from ..parallel import param_spec
from ..parallel.rules import QUANTIZED_LEAVES, TP
from .layers.fused import FUSED, FusedLayout
from .registry import checkpoint_quantization, family
from .spec import DTYPES, ModelSpec, dynamic_ntk, spec_from_config

Path = tuple[str, ...]


def checkpoint_info(source: ModelSource) -> EngineCheckpointInfo:
    """``source``'s engine checkpoint metadata, checked against its config.json (CheckpointError)."""
    info = read_info(source.hf_dir, source.architecture)
    if info.dtype not in DTYPES:
        raise CheckpointError(source.hf_dir, f'engine checkpoint dtype {info.dtype!r} is not one of {sorted(DTYPES)}')
    return info


def checkpoint_spec(source: ModelSource, dtype: str = 'auto') -> ModelSpec:
    """The spec of the model ``source`` holds, in ``dtype`` ('auto': the checkpoint's own)."""
    info = checkpoint_info(source)
    if dtype != 'auto' and dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    fam = family(source.architecture)
    spec = spec_from_config(source.config_dict(), fam, source.architecture, DTYPES['float32'],
                            source.generation_eos_ids(), source.config_path)
    return dataclasses.replace(spec, dtype=jnp.dtype(DTYPES[info.dtype if dtype == 'auto' else dtype]),
                               biases=info.biases,
                               quantization=checkpoint_quantization(source.architecture, source.config_path,
                                                                    source.config_dict()))


def _stacked(path: Path) -> bool:
    return path[0] == 'layers'


def fused_key(path: Path) -> str | None:
    """The ``FUSED`` key of the parameter at ``path`` (``qkv`` for ``.../qkv/w``), None if not fused."""
    key = path[-2] if path[-1] in ('w', 'b', *QUANTIZED_LEAVES) and len(path) > 1 else path[-1]
    return key if key in FUSED else None


def _sharding(mesh: Mesh | None, path: Path, shape: tuple[int, ...], expert_parallel: bool):
    """Where ``load_model`` places the parameter at ``path`` of ``shape`` (``expert_parallel``:
    ``ModelSpec``'s)."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    if _stacked(path):
        return NamedSharding(mesh, PartitionSpec(None, *param_spec(path, shape[1:], mesh.size, expert_parallel)))
    return NamedSharding(mesh, param_spec(path, shape, mesh.size, expert_parallel))


def _row_axis(path: Path, shape: tuple[int, ...], tp: int) -> int:
    """The axis of a fused parameter's rows: the one its partition splits over the mesh."""
    spec = param_spec(path, shape[1:] if _stacked(path) else shape, tp)
    return list(spec).index(TP) + (1 if _stacked(path) else 0)


def _row_order(saved: FusedLayout, target: FusedLayout, key: str) -> np.ndarray:
    """Row ``j`` of the fused parameter ``key`` in ``target``'s layout is row ``order[j]`` as saved."""
    offsets, offset = {}, 0
    for part, _, n in saved.segments(key):
        offsets[part] = offset
        offset += n
    return np.concatenate([offsets[part] + start + np.arange(n) for part, start, n in target.segments(key)])


def _rows_split_evenly(mesh: Mesh, path: Path, shape: tuple[int, ...]) -> NamedSharding:
    """A fused parameter of ``shape`` in one device's layout, its rows split evenly over ``mesh``
    where they divide (else replicated): where it waits for ``regroup_fused``."""
    axis = _row_axis(path, shape, mesh.size)
    spec_rows = [None] * len(shape)
    if shape[axis] % mesh.size == 0:
        spec_rows[axis] = TP
    return NamedSharding(mesh, PartitionSpec(*spec_rows))


def regroup_fused(x: jax.Array, path: Path, layout: FusedLayout, sharding: NamedSharding) -> jax.Array:
    """The fused parameter ``x`` at state path ``path`` (``fused_key``; a host array, or a device
    array anywhere), its rows in one device's layout (``FusedLayout(layout.spec)``), with its rows
    in ``layout``'s (shard by shard, KV heads repeated ``layout.kv_replicas`` times) placed with
    ``sharding``: ``x`` split evenly over ``sharding``'s mesh, then one gather compiled with
    ``sharding`` as its output, so each device receives only its own rows. Same dtype; the rows'
    axis (the one the mesh splits) grows from ``FusedLayout(layout.spec).rows`` to ``layout.rows``.
    Where ``layout`` keeps one device's row order (the experts' gate_up under expert parallelism,
    ``FusedLayout.shards``), ``x`` is placed with ``sharding`` as it is."""
    order = _row_order(FusedLayout(layout.spec), layout, fused_key(path))
    if np.array_equal(order, np.arange(order.size)):      # one device's layout (the experts' under ep): as is
        return jax.device_put(x, sharding)
    axis = _row_axis(path, x.shape, layout.tp)
    x = jax.device_put(x, _rows_split_evenly(sharding.mesh, path, x.shape))
    regroup = jax.jit(lambda x, i: jnp.take(x, i, axis=axis), out_shardings=sharding)
    return regroup(x, jnp.asarray(order))


def restore_params(source: ModelSource, dtype: str = 'auto', mesh: Mesh | None = None,
                   rope_scaling_factor: float = 0.0, ep: int = 1) -> tuple[ModelSpec, nnx.GraphDef, nnx.State, int]:
    """``(spec as stored, graphdef, params, kv_replicas)`` of the engine checkpoint ``source``, as
    ``load_model`` would give them from the Hugging Face directory it was converted from: in ``dtype``
    ('auto': the checkpoint's), sharded over ``mesh`` when given, each KV head stored
    ``kv_replicas`` times, the experts split whole over the mesh where ``ep`` says
    (``loader.with_expert_split``). CheckpointError naming the file when the
    metadata or the parameters disagree with config.json; ValueError when the mesh cannot split the
    heads or ``ep`` the experts."""
    from .loader import abstract_params, flat_state, split_for_mesh, with_expert_split
    spec = with_expert_split(checkpoint_spec(source, dtype), mesh, ep)
    if rope_scaling_factor:
        spec = dataclasses.replace(spec, rope=dynamic_ntk(spec.rope, rope_scaling_factor, spec.max_position_embeddings))
    split = split_for_mesh(spec, mesh)
    tp, replicas = (split.tp, split.kv_replicas) if split is not None else (1, 1)
    target_layout = FusedLayout(spec, tp, replicas)
    stored = dataclasses.replace(spec, num_kv_heads=target_layout.stored_kv_heads)
    _, saved_abstract = abstract_params(spec)
    graphdef, abstract = abstract_params(stored)
    saved, target = flat_state(saved_abstract), flat_state(abstract)
    restore_as = {}
    regrouped = {path for path in saved if mesh is not None and fused_key(path)
                 and target_layout.shards(fused_key(path)) > 1}
    for path, leaf in saved.items():
        sharding = _sharding(mesh, path, target[path].shape, spec.expert_parallel)
        if path in regrouped:     # rows regrouped below: restore them split evenly
            sharding = _rows_split_evenly(mesh, path, leaf.shape)
        restore_as[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)   # 4-bit: int32, float16
    params_dir = os.path.join(os.path.abspath(source.hf_dir), PARAMS_DIR)
    try:
        import orbax.checkpoint as ocp     # here: Orbax and tensorstore load only to restore a converted checkpoint
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(params_dir, traversals.unflatten_mapping(restore_as))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(params_dir, f'the parameters do not match config.json ({type(e).__name__}: {e})') from e
    flat = traversals.flatten_mapping(restored)
    for path in regrouped:
        flat[path] = regroup_fused(flat[path], path, target_layout,
                                   _sharding(mesh, path, target[path].shape, spec.expert_parallel))
    nnx.replace_by_pure_dict(abstract, traversals.unflatten_mapping(flat))
    return stored, graphdef, abstract, replicas
