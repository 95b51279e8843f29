"""What the compiled step needs to know about a model, read once from its Hugging Face config.

Frozen and hashable, so it can be closed over by (or passed statically to) jitted functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from .registry import UnsupportedArchitectureError

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters: ``rope_type`` 'default' or 'llama3' (Llama 3.1 frequency scaling)."""
    rope_type: str = 'default'
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-family decoder's shape and numerics; ``dtype`` is that of params and KV cache."""
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    dtype: jnp.dtype
    eos_token_ids: tuple[int, ...]
    intermediate_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: RopeSpec


SUPPORTED_ROPE_TYPES = ('default', 'llama3')


def rope_from_config(config: dict, architecture: str) -> RopeSpec:
    """Read rope settings from either transformers-5 ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` pair; another rope type makes the model unsupported."""
    params = dict(config.get('rope_parameters') or config.get('rope_scaling') or {})
    rope_type = params.get('rope_type') or params.get('type') or 'default'
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(architecture, f'rope type {rope_type!r}')
    theta = float(params.get('rope_theta', config.get('rope_theta', 10000.0)))
    if rope_type == 'default':
        return RopeSpec(theta=theta)
    return RopeSpec(rope_type=rope_type, theta=theta, factor=float(params['factor']),
                    low_freq_factor=float(params['low_freq_factor']),
                    high_freq_factor=float(params['high_freq_factor']),
                    original_max_position_embeddings=int(params['original_max_position_embeddings']))


def spec_from_config(config: dict, architecture: str, dtype, eos_token_ids) -> ModelSpec:
    """Build the spec of a Llama-family config (Llama, Mistral, Qwen2 share these keys)."""
    num_heads = int(config['num_attention_heads'])
    hidden = int(config['hidden_size'])
    return ModelSpec(
        architecture=architecture,
        num_layers=int(config['num_hidden_layers']),
        num_heads=num_heads,
        num_kv_heads=int(config.get('num_key_value_heads') or num_heads),
        head_dim=int(config.get('head_dim') or hidden // num_heads),
        hidden_size=hidden,
        vocab_size=int(config['vocab_size']),
        max_position_embeddings=int(config.get('max_position_embeddings', 2048)),
        dtype=jnp.dtype(dtype),
        eos_token_ids=tuple(eos_token_ids),
        intermediate_size=int(config['intermediate_size']),
        rms_norm_eps=float(config.get('rms_norm_eps', 1e-6)),
        tie_word_embeddings=bool(config.get('tie_word_embeddings', False)),
        rope=rope_from_config(config, architecture),
    )
