"""What the compiled step needs to know about a model, read once from its Hugging Face config.

Frozen and hashable, so it can be closed over by (or passed statically to) jitted functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp

from ..checkpoint.errors import CheckpointError
from ..checkpoint.quantization import WeightQuantization
from .layers.activations import ACTIVATIONS
from .registry import UnsupportedArchitectureError

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters as transformers' ``ROPE_INIT_FUNCTIONS`` read them, every
    optional one resolved (``rope_from_config``). ``rope_type`` is one of ``ROPE_TYPES``; the
    rotation covers the first ``int(head_dim * partial_rotary_factor)`` dims of each head. Fields by
    the types that read them:

    - every type: ``theta``, ``partial_rotary_factor``; ``attention_factor`` multiplies cos and sin
      (1.0 unless yarn or longrope)
    - linear, dynamic, yarn, llama3, longrope: ``factor``
    - dynamic: ``max_position_embeddings``, the length above which the base grows
    - llama3, yarn, longrope: ``original_max_position_embeddings``
    - llama3: ``low_freq_factor``, ``high_freq_factor``; yarn: ``beta_fast``, ``beta_slow``,
      ``truncate``; longrope: ``short_factor``, ``long_factor`` (one per rotated pair)
    """
    rope_type: str = 'default'
    theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    factor: float = 1.0
    attention_factor: float = 1.0
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int = 8192
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-family decoder's shape and numerics; ``dtype`` is that of params and KV cache.
    ``sliding_windows``: each layer's attention window (0: global; empty: no layer has one), a
    query at position ``p`` seeing keys ``p - window < k <= p`` as in transformers; ``qk_norm``:
    q and k RMS-normed per head before the rotary embedding (Qwen3). ``biases``: the linears
    ('qkv', 'o', 'gate_up', 'down') whose checkpoint has a bias. ``hidden_act``: the MLP's
    activation (``layers.activations.ACTIVATIONS``). ``attention_scale``: the scores' scale (0: set to
    ``head_dim ** -0.5`` by ``__post_init__``); ``attn_logit_softcap`` / ``final_logit_softcap``:
    ``cap * tanh(x / cap)`` of the attention scores / the logits (None: none); ``embed_scale``:
    multiplies the token embeddings (Gemma's ``sqrt(hidden_size)``, in the model dtype);
    ``local_rope``: the rope of the sliding-window layers where it differs from the others' ``rope``
    (Gemma 3; None: every layer rotates by ``rope``).

    A mixture of experts (``num_experts`` > 0, every layer sparse) routes each token to
    ``experts_per_token`` of them (``layers.moe``); ``intermediate_size`` is then each expert's
    width; ``norm_topk_prob``: the chosen experts' probabilities are renormalized to sum to 1;
    ``shared_expert_size``: the width of the shared expert every token also passes through (its
    output scaled by a sigmoid gate, Qwen2-MoE; 0: none). ``expert_parallel``: over a mesh, each
    device holds ``num_experts / tp`` whole experts (``TurbomindEngineConfig.ep == tp``) instead of
    a slice of every expert (``parallel.rules``).

    ``quantization``: the attention and MLP projections hold 4-bit AWQ/GPTQ weights
    (``layers.quantized_linear``; None: float weights)."""

    def __post_init__(self):
        if not self.attention_scale:
            object.__setattr__(self, 'attention_scale', self.head_dim ** -0.5)
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
    sliding_windows: tuple[int, ...] = ()
    qk_norm: bool = False
    biases: frozenset[str] = frozenset()
    hidden_act: str = 'silu'
    attention_scale: float = 0.0
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    embed_scale: float = 1.0
    local_rope: RopeSpec | None = None
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = False
    shared_expert_size: int = 0
    expert_parallel: bool = False
    quantization: WeightQuantization | None = None


ROPE_TYPES = ('default', 'linear', 'dynamic', 'yarn', 'llama3', 'longrope')


def rope_from_config(config: dict, architecture: str, partial_rotary: bool = False) -> RopeSpec:
    """The rope of a Hugging Face config dict, read as transformers 5 reads it: the parameters are
    the older ``rope_scaling`` dict when present (it wins, as in ``convert_rope_params_to_dict``),
    else ``rope_parameters``, with ``rope_theta`` and ``partial_rotary_factor`` taken from the top
    level where the dict lacks them, and ``original_max_position_embeddings`` defaulting to
    ``max_position_embeddings``.

    ``partial_rotary``: the family's transformers model rotates only the first ``rotary_dim`` dims
    (Phi-3, StableLM); the others (Llama, Mistral, Qwen2) rotate the whole head whatever
    ``partial_rotary_factor`` says in the default type, and cannot run it in the scaled ones.

    Raises UnsupportedArchitectureError for a rope type outside ``ROPE_TYPES``, per-layer rope
    parameters, or a partial factor the family's model cannot run; ValueError naming the field for
    a missing or malformed parameter."""
    params = config.get('rope_scaling') or config.get('rope_parameters') or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedArchitectureError(architecture, f'rope parameters {params!r}')
    rope_type = params.get('rope_type') or params.get('type') or 'default'
    if rope_type not in ROPE_TYPES:
        raise UnsupportedArchitectureError(architecture, f'rope type {rope_type!r}')
    max_positions = int(config.get('max_position_embeddings', 2048))
    theta = _rope_number(params, 'rope_theta', config.get('rope_theta', 10000.0))
    partial = _rope_number(params, 'partial_rotary_factor', config.get('partial_rotary_factor', 1.0))
    if not 0.0 < partial <= 1.0:
        raise ValueError(f'rope_parameters: partial_rotary_factor must be in (0, 1], got {partial!r}')
    if partial != 1.0 and not partial_rotary:
        if rope_type != 'default':
            raise UnsupportedArchitectureError(
                architecture, f'partial_rotary_factor {partial} and rope type {rope_type!r} (its transformers '
                              'model rotates whole heads)')
        partial = 1.0
    common = dict(rope_type=rope_type, theta=theta, partial_rotary_factor=partial)
    if rope_type == 'default':
        return RopeSpec(**common)
    original = int(_rope_number(params, 'original_max_position_embeddings', max_positions))
    if rope_type == 'linear':
        return RopeSpec(**common, factor=_rope_number(params, 'factor'))
    if rope_type == 'dynamic':
        return RopeSpec(**common, factor=_rope_number(params, 'factor'), max_position_embeddings=max_positions)
    if rope_type == 'llama3':
        return RopeSpec(**common, factor=_rope_number(params, 'factor'), original_max_position_embeddings=original,
                        low_freq_factor=_rope_number(params, 'low_freq_factor'),
                        high_freq_factor=_rope_number(params, 'high_freq_factor'))
    factor = params.get('factor')
    factor = max_positions / original if factor is None else _rope_number(params, 'factor')
    if rope_type == 'yarn':
        return RopeSpec(**common, factor=factor, original_max_position_embeddings=original,
                        attention_factor=_yarn_attention_factor(params, factor),
                        beta_fast=float(params.get('beta_fast') or 32), beta_slow=float(params.get('beta_slow') or 1),
                        truncate=bool(params.get('truncate', True)))
    attention = params.get('attention_factor')
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeSpec(**common, factor=factor, original_max_position_embeddings=original,
                    attention_factor=float(attention), short_factor=_rope_factors(params, 'short_factor'),
                    long_factor=_rope_factors(params, 'long_factor'))


def dynamic_ntk(rope: RopeSpec, factor: float, max_position_embeddings: int) -> RopeSpec:
    """LMDeploy's ``TurbomindEngineConfig.rope_scaling_factor``: the model's rope replaced by
    dynamic NTK scaling with ``factor`` above ``max_position_embeddings``, keeping its base and its
    rotated dims."""
    return RopeSpec(rope_type='dynamic', theta=rope.theta, partial_rotary_factor=rope.partial_rotary_factor,
                    factor=float(factor), max_position_embeddings=max_position_embeddings)


def _rope_number(params: dict, key: str, default=None) -> float:
    """``params[key]`` (else ``default``) as a float; ValueError naming the key when missing or not a number."""
    value = params.get(key, default)
    if value is None:
        raise ValueError(f'rope_parameters: rope type {params.get("rope_type") or params.get("type")!r} '
                         f'needs {key!r}')
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f'rope_parameters: {key!r} must be a number, got {value!r}')
    return float(value)


def _rope_factors(params: dict, key: str) -> tuple[float, ...]:
    value = params.get(key)
    if not isinstance(value, list) or not value or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise ValueError(f'rope_parameters: {key!r} must be a list of numbers, got {value!r}')
    return tuple(float(x) for x in value)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_attention_factor(params: dict, factor: float) -> float:
    """YaRN's cos/sin scale: ``attention_factor`` if given, else from ``mscale``/``mscale_all_dim``."""
    if params.get('attention_factor') is not None:
        return _rope_number(params, 'attention_factor')
    mscale, mscale_all_dim = params.get('mscale'), params.get('mscale_all_dim')
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def config_int(config: dict, name: str, path: str, default: int | None = None) -> int:
    """``config[name]`` as a positive int (``default`` when absent or null, if given)."""
    value = config.get(name)
    if value is None:
        if default is None:
            raise CheckpointError(path, f'field {name!r} is missing')
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(path, f'field {name!r} must be a positive integer, got {value!r}')
    return value


def config_float(config: dict, name: str, path: str, default: float) -> float:
    """``config[name]`` as a positive finite float (``default`` when absent)."""
    value = config.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float('inf'):
        raise CheckpointError(path, f'field {name!r} must be a positive number, got {value!r}')
    return float(value)


def spec_from_config(config: dict, family, architecture: str, dtype, eos_token_ids,
                     path: str = 'config.json') -> ModelSpec:
    """Build the spec of a decoder's Hugging Face config from the keys the families share (Llama's);
    the windows, q/k norms, rope style and the family's own fields follow ``family``
    (``family.Family``). CheckpointError naming ``path`` (the config's file) when a required field
    is missing or a size is not a positive integer, the KV heads do not divide the attention heads,
    or the sliding-window fields are malformed; UnsupportedArchitectureError for an activation or
    rope the engine cannot run."""
    if family.read_config is not None:
        config = family.read_config(config)
    num_heads = config_int(config, 'num_attention_heads', path)
    hidden = config_int(config, 'hidden_size', path)
    num_kv_heads = config_int(config, 'num_key_value_heads', path, num_heads)
    if num_heads % num_kv_heads:
        raise CheckpointError(path, f'num_key_value_heads ({num_kv_heads}) must divide '
                                    f'num_attention_heads ({num_heads})')
    tie = config.get('tie_word_embeddings') or False
    if not isinstance(tie, bool):
        raise CheckpointError(path, f"field 'tie_word_embeddings' must be true or false, got {tie!r}")
    num_layers = config_int(config, 'num_hidden_layers', path)
    hidden_act = config.get('hidden_activation') or config.get('hidden_act') or 'silu'
    if hidden_act not in ACTIVATIONS:
        raise UnsupportedArchitectureError(architecture, f'hidden activation {hidden_act!r}')
    spec = ModelSpec(
        architecture=architecture,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=config_int(config, 'head_dim', path, max(1, hidden // num_heads)),
        hidden_size=hidden,
        vocab_size=config_int(config, 'vocab_size', path),
        max_position_embeddings=config_int(config, 'max_position_embeddings', path, 2048),
        dtype=jnp.dtype(dtype),
        eos_token_ids=tuple(eos_token_ids),
        intermediate_size=config_int(config, 'intermediate_size', path),
        rms_norm_eps=config_float(config, 'rms_norm_eps', path, 1e-6),
        tie_word_embeddings=tie,
        rope=_layer_type_rope(config, family, 'full_attention', architecture, path),
        local_rope=_layer_type_rope(config, family, 'sliding_attention', architecture, path),
        sliding_windows=sliding_windows(config, family.sliding_window, num_layers, path),
        qk_norm=family.qk_norm,
        hidden_act=hidden_act,
    )
    return family.adjust_spec(spec, config, path) if family.adjust_spec is not None else spec


# transformers' defaults where config.json leaves a field out (MistralConfig, Qwen2Config, Qwen3Config)
DEFAULT_SLIDING_WINDOW, DEFAULT_MAX_WINDOW_LAYERS = 4096, 28
LAYER_TYPES = ('full_attention', 'sliding_attention')


def sliding_windows(config: dict, style: str | None, num_layers: int, path: str) -> tuple[int, ...]:
    """Each layer's window (0: global) as the family's transformers model reads ``config``, or
    ``()`` when no layer slides; ``style`` as ``family.Family.sliding_window``. CheckpointError
    naming ``path`` for a window that is not a positive integer or null, a ``layer_types`` of
    another length or with another value, or sliding layers without a window (transformers refuses
    those too)."""
    if style is None:
        return ()
    window = config.get('sliding_window', DEFAULT_SLIDING_WINDOW)
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise CheckpointError(path, f"field 'sliding_window' must be a positive integer or null, got {window!r}")
    if style == 'all_layers':
        return (window,) * num_layers if window else ()
    if not config.get('use_sliding_window', False):
        window = None
    types = config.get('layer_types')
    if types is None:
        first = config.get('max_window_layers', DEFAULT_MAX_WINDOW_LAYERS)
        if not isinstance(first, int) or isinstance(first, bool):
            raise CheckpointError(path, f"field 'max_window_layers' must be an integer, got {first!r}")
        types = [LAYER_TYPES[window is not None and i >= first] for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise CheckpointError(path, f"field 'layer_types' must list one of {LAYER_TYPES} for each of the "
                                    f"{num_layers} layers, got {types!r}")
    sliding = [t == 'sliding_attention' for t in types]
    if any(sliding) and window is None:
        raise CheckpointError(path, "field 'layer_types' has sliding_attention layers, but there is no window "
                                    "('sliding_window' null or 'use_sliding_window' false)")
    return tuple(window if s else 0 for s in sliding) if any(sliding) else ()


def _layer_type_rope(config: dict, family, layer_type: str, architecture: str, path: str) -> RopeSpec | None:
    """The rope of the layers of ``layer_type``: for a family with ``layer_type_ropes`` (Gemma 3), the
    config with that type's rope parameters; else the config's rope for 'full_attention' and None
    (no rope of their own) for 'sliding_attention'."""
    if family.layer_type_ropes is None:
        return _rope(config, architecture, path, family.partial_rotary) if layer_type == 'full_attention' else None
    params = family.layer_type_ropes(config, path)[layer_type]
    return _rope({**config, 'rope_scaling': None, 'rope_parameters': params}, architecture, path,
                 family.partial_rotary)


def _rope(config: dict, architecture: str, path: str, partial_rotary: bool) -> RopeSpec:
    """``rope_from_config``, its ValueError for a malformed parameter naming ``path``."""
    try:
        return rope_from_config(config, architecture, partial_rotary)
    except UnsupportedArchitectureError:
        raise
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
