"""Read a Hugging Face safetensors checkpoint straight into the params pytree of ``llama.py``, in
the target dtype (no torch): on the default device, or, given a mesh, each shard read from the file
onto its own device (no device ever holds a whole sharded weight)."""
from __future__ import annotations

import glob
import os
from contextlib import ExitStack

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open

from ..parallel import HeadSplit, from_host, param_spec
from .spec import ModelSpec

_SAFETENSORS_DTYPES = {'F32': 'float32', 'BF16': 'bfloat16', 'F16': 'float16'}

# params key -> HF module under ``model.layers.{i}.``
_LAYER_LINEARS = {
    'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj', 'v': 'self_attn.v_proj',
    'o': 'self_attn.o_proj', 'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj', 'down': 'mlp.down_proj',
}
_LAYER_NORMS = {'input_norm': 'input_layernorm', 'post_norm': 'post_attention_layernorm'}


class SafetensorsCheckpoint:
    """Every tensor of a directory's ``*.safetensors`` files, by name; a context manager."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self.files = sorted(glob.glob(os.path.join(hf_dir, '*.safetensors')))
        if not self.files:
            raise FileNotFoundError(f'no *.safetensors weights in {hf_dir!r}')
        self._stack = ExitStack()
        self._where: dict[str, object] = {}

    def __enter__(self) -> 'SafetensorsCheckpoint':
        for path in self.files:
            handle = self._stack.enter_context(safe_open(path, framework='numpy'))
            self._where.update(dict.fromkeys(handle.keys(), handle))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _handle(self, name: str):
        if name not in self._where:
            raise KeyError(f'tensor {name!r} is missing from the checkpoint in {self.hf_dir!r}')
        return self._where[name]

    def dtype_name(self, name: str) -> str:
        """The stored dtype of ``name`` as 'float32' | 'bfloat16' | 'float16'."""
        stored = self._handle(name).get_slice(name).get_dtype()
        if stored not in _SAFETENSORS_DTYPES:
            raise ValueError(f'tensor {name!r} is stored as {stored}; expected one of '
                             f'{sorted(_SAFETENSORS_DTYPES)}')
        return _SAFETENSORS_DTYPES[stored]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str, dtype) -> jax.Array:
        """The whole tensor on the default device."""
        return jnp.asarray(self._handle(name).get_tensor(name).astype(dtype))

    def read(self, name: str, index: tuple[slice, ...], dtype) -> np.ndarray:
        """One slice of the tensor, read from the file alone (the rest stays on disk)."""
        return self._handle(name).get_slice(name)[index].astype(dtype)


class _Placer:
    """Puts each tensor where it belongs: whole on the default device without a mesh, else shard
    by shard per ``parallel.param_spec``, k/v rows repeated ``split.kv_replicas`` times."""

    def __init__(self, ckpt: SafetensorsCheckpoint, dtype, mesh: Mesh | None, split: HeadSplit | None,
                 head_dim: int):
        self.ckpt, self.dtype, self.mesh, self.split, self.head_dim = ckpt, dtype, mesh, split, head_dim

    def __call__(self, name: str, key: str, leaf: str | None) -> jax.Array:
        if self.mesh is None:
            return self.ckpt.get(name, self.dtype)
        shape = self.ckpt.shape(name)
        replicas = self.split.kv_replicas if key in ('k', 'v') else 1
        shape = (shape[0] * replicas, *shape[1:])

        def read(index: tuple[slice, ...]) -> np.ndarray:
            if replicas > 1:
                index = (_checkpoint_rows(index[0], self.head_dim, replicas), *index[1:])
            return self.ckpt.read(name, index, self.dtype)

        return from_host(shape, self.mesh, param_spec(key, leaf, shape, self.split.tp), read)


def _checkpoint_rows(rows: slice, head_dim: int, replicas: int) -> slice:
    """The checkpoint rows behind ``rows`` of a k/v weight whose heads are each stored ``replicas``
    times. A shard then holds one stored head, hence one contiguous checkpoint head."""
    start = rows.start // head_dim // replicas * head_dim + rows.start % head_dim
    return slice(start, start + rows.stop - rows.start)


def _linear(ckpt: SafetensorsCheckpoint, place: _Placer, prefix: str, key: str) -> dict:
    p = {'w': place(f'{prefix}.weight', key, 'w')}
    if f'{prefix}.bias' in ckpt:
        p['b'] = place(f'{prefix}.bias', key, 'b')
    return p


def load_params(ckpt: SafetensorsCheckpoint, spec: ModelSpec, mesh: Mesh | None = None,
                split: HeadSplit | None = None) -> dict:
    """Build the params pytree; biases are loaded wherever the checkpoint has them. With a mesh,
    ``split`` says how its devices share the heads."""
    place = _Placer(ckpt, spec.dtype, mesh, split, spec.head_dim)
    layers = []
    for i in range(spec.num_layers):
        prefix = f'model.layers.{i}'
        layer = {key: _linear(ckpt, place, f'{prefix}.{name}', key) for key, name in _LAYER_LINEARS.items()}
        layer.update({key: place(f'{prefix}.{name}.weight', key, None) for key, name in _LAYER_NORMS.items()})
        layers.append(layer)
    params = {'embed': place('model.embed_tokens.weight', 'embed', None), 'layers': layers,
              'norm': place('model.norm.weight', 'norm', None)}
    if not spec.tie_word_embeddings:
        params['lm_head'] = _linear(ckpt, place, 'lm_head', 'lm_head')
    return params
