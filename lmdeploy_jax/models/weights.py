"""Read a Hugging Face safetensors checkpoint straight into the params pytree of ``llama.py``,
on the default device and in the target dtype (no torch)."""
from __future__ import annotations

import glob
import os
from contextlib import ExitStack

import jax.numpy as jnp
from safetensors import safe_open

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
            handle = self._stack.enter_context(safe_open(path, framework='flax'))
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

    def get(self, name: str, dtype) -> jnp.ndarray:
        return self._handle(name).get_tensor(name).astype(dtype)


def _linear(ckpt: SafetensorsCheckpoint, prefix: str, dtype) -> dict:
    p = {'w': ckpt.get(f'{prefix}.weight', dtype)}
    if f'{prefix}.bias' in ckpt:
        p['b'] = ckpt.get(f'{prefix}.bias', dtype)
    return p


def load_params(ckpt: SafetensorsCheckpoint, spec: ModelSpec) -> dict:
    """Build the params pytree; biases are loaded wherever the checkpoint has them."""
    dtype = spec.dtype
    layers = []
    for i in range(spec.num_layers):
        prefix = f'model.layers.{i}'
        layer = {key: _linear(ckpt, f'{prefix}.{name}', dtype) for key, name in _LAYER_LINEARS.items()}
        layer.update({key: ckpt.get(f'{prefix}.{name}.weight', dtype) for key, name in _LAYER_NORMS.items()})
        layers.append(layer)
    params = {'embed': ckpt.get('model.embed_tokens.weight', dtype), 'layers': layers,
              'norm': ckpt.get('model.norm.weight', dtype)}
    if not spec.tie_word_embeddings:
        params['lm_head'] = _linear(ckpt, 'lm_head', dtype)
    return params
