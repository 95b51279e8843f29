"""Gemma 2 and Gemma 3 (text): sandwich norms (``layers.sandwich``), RMSNorms that multiply by
``1 + w`` (the model stores ``1 + w``), GeGLU, embeddings scaled by ``sqrt(hidden_size)`` in the
model's dtype, attention scaled by ``query_pre_attn_scalar ** -0.5``, sliding-window layers by
``layer_types``. Gemma 2 soft-caps the attention scores and the logits; Gemma 3 norms q and k per
head and rotates its sliding layers by a rope of their own (``spec.local_rope``)."""
from __future__ import annotations

import dataclasses
import math

from ...checkpoint.errors import CheckpointError
from ..family import Family
from ..layers.decoder import CausalLM
from ..layers.sandwich import SandwichDecoderLayer
from ..registry import UnsupportedArchitectureError
from ..spec import LAYER_TYPES, ModelSpec, config_float, sliding_windows
from ..weight_map import Path, Source, Tensor, linear

LAYER = 'model.layers.{i}.'
# how often a global layer comes when config.json has no layer_types (transformers' defaults)
GEMMA2_PATTERN, GEMMA3_PATTERN = 2, 6
# Gemma3TextConfig.default_theta: the global and the sliding layers' rope base
GEMMA3_THETA = {'full_attention': 1_000_000.0, 'sliding_attention': 10_000.0}


class Gemma(CausalLM):
    layer_class = SandwichDecoderLayer


def _norm(name: str) -> Tensor:
    return Tensor(name, add=1.0)


def weight_map(spec: ModelSpec) -> dict[Path, Source]:
    """Hugging Face's Gemma names; every norm read as ``1 + w``."""
    attn = LAYER + 'self_attn.'
    return {
        ('embed',): Tensor('model.embed_tokens.weight'),
        ('norm', 'weight'): _norm('model.norm.weight'),
        **linear(('lm_head',), 'lm_head'),
        ('layers', 'input_norm', 'weight'): _norm(LAYER + 'input_layernorm.weight'),
        ('layers', 'post_attn_norm', 'weight'): _norm(LAYER + 'post_attention_layernorm.weight'),
        ('layers', 'pre_mlp_norm', 'weight'): _norm(LAYER + 'pre_feedforward_layernorm.weight'),
        ('layers', 'post_mlp_norm', 'weight'): _norm(LAYER + 'post_feedforward_layernorm.weight'),
        ('layers', 'attn', 'q_norm', 'weight'): _norm(attn + 'q_norm.weight'),
        ('layers', 'attn', 'k_norm', 'weight'): _norm(attn + 'k_norm.weight'),
        **linear(('layers', 'attn', 'qkv'), (attn + 'q_proj', attn + 'k_proj', attn + 'v_proj')),
        **linear(('layers', 'attn', 'o'), attn + 'o_proj'),
        **linear(('layers', 'mlp', 'gate_up'), (LAYER + 'mlp.gate_proj', LAYER + 'mlp.up_proj')),
        **linear(('layers', 'mlp', 'down'), LAYER + 'mlp.down_proj'),
    }


def _optional_cap(config: dict, name: str, path: str) -> float | None:
    value = config.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise CheckpointError(path, f'field {name!r} must be a positive number or null, got {value!r}')
    return float(value)


def _adjust(pattern: int):
    def adjust(spec: ModelSpec, config: dict, path: str) -> ModelSpec:
        """Gemma's scale, soft caps, embedding scale and windows (``layer_types``, else one global
        layer every ``sliding_window_pattern``, as transformers fills them in). Bidirectional
        attention (EmbeddingGemma's ``use_bidirectional_attention``) is refused."""
        if config.get('use_bidirectional_attention'):
            raise UnsupportedArchitectureError(spec.architecture, 'use_bidirectional_attention')
        scalar = config_float(config, 'query_pre_attn_scalar', path, 256)
        every = config.get('sliding_window_pattern', pattern)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise CheckpointError(path, f"field 'sliding_window_pattern' must be a positive integer, got {every!r}")
        types = config.get('layer_types') or [LAYER_TYPES[bool((i + 1) % every)] for i in range(spec.num_layers)]
        windows = sliding_windows({**config, 'use_sliding_window': True, 'layer_types': types}, 'per_layer',
                                  spec.num_layers, path)
        return dataclasses.replace(
            spec, attention_scale=scalar ** -0.5, embed_scale=spec.hidden_size ** 0.5,
            attn_logit_softcap=_optional_cap(config, 'attn_logit_softcapping', path),
            final_logit_softcap=_optional_cap(config, 'final_logit_softcapping', path), sliding_windows=windows)
    return adjust


def gemma3_ropes(config: dict, path: str) -> dict[str, dict]:
    """Gemma3TextConfig's rope parameters per layer type: ``rope_parameters`` keyed by layer type,
    or from an older config.json, the global layers' ``rope_scaling`` and ``rope_theta`` and the
    sliding layers' ``rope_local_base_freq`` (transformers' defaults where absent)."""
    params = config.get('rope_parameters') or {}
    if not isinstance(params, dict) or not set(params) <= set(LAYER_TYPES) or not all(
            isinstance(v, dict) for v in params.values()):
        raise CheckpointError(path, f"field 'rope_parameters' must map {LAYER_TYPES} to rope parameters, "
                                    f'got {params!r}')
    ropes = {t: dict(params.get(t) or {'rope_type': 'default'}) for t in LAYER_TYPES}
    ropes['full_attention'].update(config.get('rope_scaling') or {})
    ropes['full_attention'].setdefault('rope_theta', config.get('rope_theta', GEMMA3_THETA['full_attention']))
    ropes['sliding_attention'].setdefault('rope_theta', config.get('rope_local_base_freq',
                                                                   GEMMA3_THETA['sliding_attention']))
    return ropes


FAMILIES = {
    'Gemma2ForCausalLM': Family(Gemma, weight_map, adjust_spec=_adjust(GEMMA2_PATTERN)),
    'Gemma3ForCausalLM': Family(Gemma, weight_map, qk_norm=True, adjust_spec=_adjust(GEMMA3_PATTERN),
                                layer_type_ropes=gemma3_ropes),
}
