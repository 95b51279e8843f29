"""A model's parameters from a safetensors checkpoint, by its family's weight map
(``weight_map.py``): every weight put straight onto its device(s) in its parameter's dtype, layer by
layer, the fused ones laid out shard by shard (``layers.fused``)."""
from __future__ import annotations

import concurrent.futures
import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from ..checkpoint.errors import CheckpointError
from ..checkpoint.quantization import checkpoint_shapes, device_array
from ..parallel import param_spec
from ..parallel.rules import QUANTIZED_LEAVES
from .layers.fused import FUSED, FusedLayout
from .safetensors_file import SafetensorsCheckpoint
from .weight_map import Experts, Fused, Path, Quantized, Source, Tensor, module_name

PREFETCH_LAYERS = 4      # layers read from disk and sent to the device ahead of the one being placed

ReadFn = Callable[[tuple[slice, ...]], np.ndarray]


def _stacked(source: Source) -> bool:
    if isinstance(source, Quantized):
        return _stacked(source.source)
    return isinstance(source, (Fused, Experts)) or '{i}' in source.name


def _fused_key(path: Path) -> str:
    """The ``FUSED`` key of the parameter at ``path``: its ``Linear``'s name (``.../gate_up/w``), or
    the parameter's own (an expert stack's ``.../experts/gate_up``)."""
    return path[-2] if path[-1] in ('w', 'b', *QUANTIZED_LEAVES) and len(path) > 1 else path[-1]


def _sources(weight_map: dict[Path, Source], abstract: dict[Path, jax.ShapeDtypeStruct]) -> dict[Path, Source]:
    """The map's source of every parameter; RuntimeError naming a parameter the family left out."""
    missing = [path for path in abstract if path not in weight_map]
    if missing:
        raise RuntimeError(f'the weight map names no checkpoint tensor for {["/".join(p) for p in missing]}')
    return {path: weight_map[path] for path in abstract}


def expected_shapes(spec, weight_map: dict[Path, Source],
                    abstract: dict[Path, jax.ShapeDtypeStruct]) -> dict[str, tuple[int, ...]]:
    """The shape of every checkpoint tensor the parameters ``abstract`` (of a model of ``spec`` on one
    device, by state path) read, by name."""
    layout = FusedLayout(spec)
    shapes = {}
    for path, source in _sources(weight_map, abstract).items():
        shapes.update(_tensor_shapes(layout, _fused_key(path), source, abstract[path].shape))
    return shapes


def _tensor_shapes(layout: FusedLayout, key: str, source: Source, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors ``source`` reads into a parameter of ``shape``, by name."""
    if isinstance(source, Experts):
        shapes = {}
        for e in range(source.count):
            shapes.update(_tensor_shapes(layout, key, source.expert(e), (shape[0], *shape[2:])))
        return shapes
    if isinstance(source, Quantized):
        return _quantized_shapes(layout, key, source, shape)
    if isinstance(source, Tensor):
        if '{i}' in source.name:
            return {source.name.format(i=i): shape[1:] for i in range(shape[0])}
        return {source.name: shape}
    shapes = {}
    for kind, part in zip(FUSED[key], source.parts):
        rows = part.tensor_rows or layout.shard_part_rows(kind, 0)[1]
        shapes.update({part.name.format(i=i): (rows, *shape[2:]) for i in range(shape[0])})
    return shapes


def _module_columns(layout: FusedLayout, key: str, source: Tensor | Fused, columns: int) -> dict[str, int]:
    """The module name (with ``{i}``) of each tensor of a quantized linear, and its output columns."""
    if isinstance(source, Tensor):
        return {module_name(source.name): columns}
    return {module_name(part.name): part.tensor_rows or layout.shard_part_rows(kind, 0)[1]
            for kind, part in zip(FUSED[key], source.parts)}


def _quantized_shapes(layout: FusedLayout, key: str, source: Quantized, shape: tuple[int, ...]):
    """The checkpoint tensors (name -> shape) the stacked 4-bit array ``shape [layers, rows, out]`` reads."""
    shapes = {}
    for module, columns in _module_columns(layout, key, source.source, shape[-1]).items():
        for i in range(shape[0]):
            shapes.update(checkpoint_shapes(source.method, module.format(i=i), source.leaf, shape[-2], columns))
    return shapes


def check_tensors(ckpt: SafetensorsCheckpoint, shapes: dict[str, tuple[int, ...]], config_path: str) -> None:
    """CheckpointError naming the weights file when a tensor of ``shapes`` (``expected_shapes``, as
    the config at ``config_path`` implies) is missing or has another shape."""
    for name, shape in shapes.items():
        if name not in ckpt:
            raise CheckpointError(ckpt.location, f'tensor {name!r} is missing (expected from {config_path})')
        if ckpt.shape(name) != shape:
            raise CheckpointError(ckpt.file_of(name), f'tensor {name!r} has shape {ckpt.shape(name)}, but '
                                                      f'{config_path} implies {shape}')


def _read_fused(ckpt: SafetensorsCheckpoint, source: Fused, segments, layer: int,
                index: tuple[slice, ...]) -> np.ndarray:
    """Rows ``index[0]`` (and columns ``index[1:]``) of one layer's fused weight or bias, whose rows
    are ``segments`` (``FusedLayout.segments``)."""
    rows, rest = index[0], index[1:]
    lo, hi = rows.start or 0, rows.stop if rows.stop is not None else sum(n for _, _, n in segments)
    pieces, offset = [], 0
    for part_index, start, n in segments:
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            part = source.parts[part_index]
            view = ckpt.view(part.name.format(i=layer))
            pieces.append(part.read(view, start + a - offset, start + b - offset, rest))
        offset += n
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def _read_quantized(ckpt: SafetensorsCheckpoint, source: Quantized, segments, layer: int,
                    index: tuple[slice, ...]) -> np.ndarray:
    """``index`` of one layer's 4-bit device array (``checkpoint.quantization.device_array``); a
    fused one's parts side by side along its last axis by ``segments`` (``FusedLayout.segments``)."""
    convert = lambda module: device_array(source.method, ckpt.view, module.format(i=layer), source.leaf)  # noqa: E731
    if segments is None:
        return convert(module_name(source.source.name))[index]
    arrays, columns = {}, []
    for part_index, start, n in segments:
        part = source.source.parts[part_index]
        module = module_name(part.name)
        if module not in arrays:
            arrays[module] = convert(module)
        columns.append(part.read(arrays[module].T, start, start + n, ()).T)
    return np.concatenate(columns, axis=1)[index]


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, layer: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)


def _ordered_prefetch(make: Callable[[int], jax.Array], n: int, pool) -> Iterator[jax.Array]:
    """``make(0) .. make(n - 1)`` in order, each started up to ``PREFETCH_LAYERS`` ahead."""
    pending = [pool.submit(make, i) for i in range(min(n, PREFETCH_LAYERS))]
    for i in range(n):
        if i + PREFETCH_LAYERS < n:
            pending.append(pool.submit(make, i + PREFETCH_LAYERS))
        yield pending[i].result()


class _Placer:
    """Puts arrays where they belong in their dtype: on the default device, or shard by shard over
    the mesh, each device receiving only its own piece (read from the file for it)."""

    def __init__(self, mesh: Mesh | None, pool: concurrent.futures.Executor):
        self.mesh, self.pool = mesh, pool

    def _sharding(self, spec: PartitionSpec):
        return NamedSharding(self.mesh, spec) if self.mesh is not None else SingleDeviceSharding(jax.devices()[0])

    def array(self, shape: tuple[int, ...], dtype, spec: PartitionSpec, read: ReadFn) -> jax.Array:
        return jax.make_array_from_callback(shape, self._sharding(spec), lambda index: np.asarray(read(index), dtype))

    def stacked(self, shape: tuple[int, ...], dtype, spec: PartitionSpec,
                read_layer: Callable[[int, tuple[slice, ...]], np.ndarray]) -> jax.Array:
        """``shape = [layers, ...]`` built in place on the device(s), one layer at a time (the host
        never holds more than a few layers; the device one stack plus a few layers)."""
        stack = jnp.zeros(shape, dtype, device=self._sharding(PartitionSpec(None, *spec)))
        make = lambda i: self.array(shape[1:], dtype, spec, functools.partial(read_layer, i))  # noqa: E731
        for i, layer in enumerate(_ordered_prefetch(make, shape[0], self.pool)):
            stack = _set_layer(stack, layer, np.int32(i))
        return stack


def _reader(ckpt: SafetensorsCheckpoint, source: Source, layout: FusedLayout, key: str):
    """``read(layer, index)`` (``layer`` None for an unstacked tensor) of ``source``'s values."""
    if isinstance(source, Experts):
        experts = [_reader(ckpt, source.expert(e), layout, key) for e in range(source.count)]
        return lambda i, index: np.stack([experts[e](i, index[1:]) for e in range(source.count)[index[0]]])
    if isinstance(source, Fused):
        segments = layout.segments(key)
        return lambda i, index: _read_fused(ckpt, source, segments, i, index)
    if isinstance(source, Quantized):
        segments = layout.segments(key) if isinstance(source.source, Fused) else None
        return functools.partial(_read_quantized, ckpt, source, segments)

    def read(i, index):
        values = ckpt.view(source.name if i is None else source.name.format(i=i))[index]
        return np.asarray(values, np.float32) + np.float32(source.add) if source.add else values
    return read


def load_state(ckpt: SafetensorsCheckpoint, weight_map: dict[Path, Source], abstract: dict[Path, jax.ShapeDtypeStruct],
               layout: FusedLayout, mesh: Mesh | None = None) -> dict[Path, jax.Array]:
    """Every parameter of ``abstract`` (state path -> shape and dtype, as stored: KV heads repeated
    where ``layout.kv_replicas`` says) read from ``ckpt`` by ``weight_map``, placed on the device or
    sharded over ``mesh`` by ``parallel.param_spec`` (the experts whole where ``layout.spec.expert_parallel``)."""
    tp, ep = (mesh.size if mesh is not None else 1), layout.spec.expert_parallel
    state = {}
    with concurrent.futures.ThreadPoolExecutor(PREFETCH_LAYERS) as pool:
        place = _Placer(mesh, pool)
        for path, source in _sources(weight_map, abstract).items():
            shape, dtype = abstract[path].shape, abstract[path].dtype
            read = _reader(ckpt, source, layout, _fused_key(path))
            if _stacked(source):
                state[path] = place.stacked(shape, dtype, param_spec(path, shape[1:], tp, ep), read)
            else:
                state[path] = place.array(shape, dtype, param_spec(path, shape, tp, ep), functools.partial(read, None))
    return state
