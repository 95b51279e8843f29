"""What the compiled step needs to know about a model, read once from its Hugging Face config.

Frozen and hashable, so it can be closed over by (or passed statically to) jitted functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from ..checkpoint.errors import CheckpointError
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


def _config_int(config: dict, name: str, path: str, default: int | None = None) -> int:
    """``config[name]`` as a positive int (``default`` when absent or null, if given)."""
    value = config.get(name)
    if value is None:
        if default is None:
            raise CheckpointError(path, f'field {name!r} is missing')
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(path, f'field {name!r} must be a positive integer, got {value!r}')
    return value


def _config_float(config: dict, name: str, path: str, default: float) -> float:
    """``config[name]`` as a positive finite float (``default`` when absent)."""
    value = config.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float('inf'):
        raise CheckpointError(path, f'field {name!r} must be a positive number, got {value!r}')
    return float(value)


def spec_from_config(config: dict, architecture: str, dtype, eos_token_ids, path: str = 'config.json') -> ModelSpec:
    """Build the spec of a Llama-family config (Llama, Mistral, Qwen2 share these keys).
    CheckpointError naming ``path`` (the config's file) when a required field is missing or a
    size is not a positive integer, or the KV heads do not divide the attention heads."""
    num_heads = _config_int(config, 'num_attention_heads', path)
    hidden = _config_int(config, 'hidden_size', path)
    num_kv_heads = _config_int(config, 'num_key_value_heads', path, num_heads)
    if num_heads % num_kv_heads:
        raise CheckpointError(path, f'num_key_value_heads ({num_kv_heads}) must divide '
                                    f'num_attention_heads ({num_heads})')
    tie = config.get('tie_word_embeddings') or False
    if not isinstance(tie, bool):
        raise CheckpointError(path, f"field 'tie_word_embeddings' must be true or false, got {tie!r}")
    return ModelSpec(
        architecture=architecture,
        num_layers=_config_int(config, 'num_hidden_layers', path),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=_config_int(config, 'head_dim', path, max(1, hidden // num_heads)),
        hidden_size=hidden,
        vocab_size=_config_int(config, 'vocab_size', path),
        max_position_embeddings=_config_int(config, 'max_position_embeddings', path, 2048),
        dtype=jnp.dtype(dtype),
        eos_token_ids=tuple(eos_token_ids),
        intermediate_size=_config_int(config, 'intermediate_size', path),
        rms_norm_eps=_config_float(config, 'rms_norm_eps', path, 1e-6),
        tie_word_embeddings=tie,
        rope=_rope(config, architecture, path),
    )


def _rope(config: dict, architecture: str, path: str) -> RopeSpec:
    """``rope_from_config``, its ValueError for a malformed parameter naming ``path``."""
    try:
        return rope_from_config(config, architecture)
    except UnsupportedArchitectureError:
        raise
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
