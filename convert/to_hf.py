"""``export_hf``: an engine checkpoint (or any model the JAX engine loads) -> a Hugging Face
safetensors directory, by inverting the family's weight map: stacked parameters split per layer,
fused projections split into their parts (rows put back where a packed tensor holds them, and
permuted rows unpermuted), norm offsets subtracted, experts unstacked."""
from __future__ import annotations

import os

import numpy as np

from lmdeploy_jax.checkpoint.engine_checkpoint import copy_model_files, new_directory
from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.models import load_model
from lmdeploy_jax.models.layers.fused import FusedLayout
from lmdeploy_jax.models.loader import flat_state
from lmdeploy_jax.models.registry import family
from lmdeploy_jax.models.restore import fused_key
from lmdeploy_jax.models.weight_map import Experts, Fused, Source, Tensor

WEIGHTS_FILE = 'model.safetensors'


def _unfuse(source: Fused, segments: list[tuple[int, int, int]], value: np.ndarray) -> dict[str, np.ndarray]:
    """The checkpoint tensors of one fused parameter ``value [layers, rows, ...]`` laid out by
    ``segments`` (``FusedLayout.segments`` at tp=1)."""
    tensors, offset = {}, 0
    for part_index, start, n in segments:
        part = source.parts[part_index]
        rows = np.arange(start, start + n) if part.rows is None else part.rows[start:start + n]
        for i in range(value.shape[0]):
            name = part.name.format(i=i)
            if name not in tensors:
                tensors[name] = np.zeros((part.tensor_rows or n, *value.shape[2:]), value.dtype)
            tensors[name][rows] = value[i, offset:offset + n]
        offset += n
    return tensors


def _checkpoint_tensors(source: Source, layout: FusedLayout, key: str | None,
                        value: np.ndarray) -> dict[str, np.ndarray]:
    """The checkpoint tensors (by name) that ``source`` reads into a parameter holding ``value``."""
    if isinstance(source, Experts):
        tensors = {}
        for e in range(source.count):
            tensors.update(_checkpoint_tensors(source.expert(e), layout, key, value[:, e]))
        return tensors
    if isinstance(source, Fused):
        return _unfuse(source, layout.segments(key), value)
    assert isinstance(source, Tensor)
    if source.add:
        value = (value.astype(np.float32) - np.float32(source.add)).astype(value.dtype)
    if '{i}' in source.name:
        return {source.name.format(i=i): value[i] for i in range(value.shape[0])}
    return {source.name: value}


def _save_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
    """Write ``tensors`` as one safetensors file (bfloat16 kept as bfloat16)."""
    import torch
    from safetensors.torch import save_file

    def to_torch(a: np.ndarray):
        if a.dtype.name == 'bfloat16':
            return torch.from_numpy(np.array(a).view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(np.array(a))          # a writable copy: jax's arrays are read-only
    save_file({name: to_torch(a) for name, a in sorted(tensors.items())}, path, metadata={'format': 'pt'})


def export_hf(model_path: str, dst_path: str, dtype: str = 'auto') -> str:
    """Write ``model_path`` (an engine checkpoint, or anything ``pipeline()`` loads with the JAX engine)
    as a Hugging Face directory ``dst_path`` (new or empty): ``model.safetensors`` in ``dtype``
    ('auto': the parameters' own), beside the config and tokenizer files. Returns ``dst_path``.
    Raises ValueError when ``dst_path`` holds files or ``dtype`` is unknown,
    UnsupportedArchitectureError / CheckpointError as loading does."""
    dst = new_directory(dst_path)
    source = resolve_model(model_path)
    model = load_model(source, dtype)          # on one device: the tp=1 layout the weight map inverts
    weight_map = family(model.spec.architecture).weight_map(model.spec)
    layout = FusedLayout(model.spec)
    tensors = {}
    for path, value in flat_state(model.params).items():
        tensors.update(_checkpoint_tensors(weight_map[path], layout, fused_key(path), np.asarray(value)))
    os.makedirs(dst, exist_ok=True)
    _save_safetensors(tensors, os.path.join(dst, WEIGHTS_FILE))
    copy_model_files(source.hf_dir, dst)
    return dst_path
