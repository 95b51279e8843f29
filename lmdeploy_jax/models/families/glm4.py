"""GLM-4-0414 (``Glm4ForCausalLM``): sandwich norms (``layers.sandwich``), q/k/v biases, gate and
up packed in one ``gate_up_proj``, and a partial rotary embedding (half of each head by default)
that rotates interleaved pairs ``(2j, 2j + 1)``.

The engine's rope rotates halves (pairs ``(j, j + rotary_dim / 2)``), so the q and k rows of each
head (and their biases) are loaded permuted within the rotary dims, even dims first, then odd:
rotating the halves of the permuted head is the interleaved rotation of the original one, permuted
the same way. Attention scores are dot products over a head's dims, the same for q and k permuted
alike; v is not permuted, so the attention output is the transformers model's."""
from __future__ import annotations

import dataclasses

import numpy as np

from ..family import Family
from ..layers.decoder import CausalLM
from ..layers.sandwich import SandwichDecoderLayer
from ..rope import rotary_dim
from ..spec import ModelSpec
from ..weight_map import Part, Path, Source, Tensor, linear, packed_parts

LAYER = 'model.layers.{i}.'
DEFAULT_PARTIAL_ROTARY = 0.5     # Glm4Config's when config.json gives none


class Glm4(CausalLM):
    layer_class = SandwichDecoderLayer


def interleaved_to_halves(heads: int, head_dim: int, rotary: int) -> np.ndarray:
    """Rows ``[heads * head_dim]``: row ``h * head_dim + j`` of the result is row
    ``h * head_dim + order[j]`` of the checkpoint, ``order`` the even rotary dims, the odd ones,
    then the dims past ``rotary`` as they are."""
    order = np.concatenate([np.arange(0, rotary, 2), np.arange(1, rotary, 2), np.arange(rotary, head_dim)])
    return (np.arange(heads)[:, None] * head_dim + order).reshape(-1)


def weight_map(spec: ModelSpec) -> dict[Path, Source]:
    """Hugging Face's GLM-4 names, q/k rows permuted for rotate-half (module docstring)."""
    attn = LAYER + 'self_attn.'
    d, rotary, inter = spec.head_dim, rotary_dim(spec.rope, spec.head_dim), spec.intermediate_size
    return {
        ('embed',): Tensor('model.embed_tokens.weight'),
        ('norm', 'weight'): Tensor('model.norm.weight'),
        **linear(('lm_head',), 'lm_head'),
        ('layers', 'input_norm', 'weight'): Tensor(LAYER + 'input_layernorm.weight'),
        ('layers', 'post_attn_norm', 'weight'): Tensor(LAYER + 'post_self_attn_layernorm.weight'),
        ('layers', 'pre_mlp_norm', 'weight'): Tensor(LAYER + 'post_attention_layernorm.weight'),
        ('layers', 'post_mlp_norm', 'weight'): Tensor(LAYER + 'post_mlp_layernorm.weight'),
        **linear(('layers', 'attn', 'qkv'), (Part(attn + 'q_proj', interleaved_to_halves(spec.num_heads, d, rotary)),
                                             Part(attn + 'k_proj', interleaved_to_halves(spec.num_kv_heads, d, rotary)),
                                             Part(attn + 'v_proj'))),
        **linear(('layers', 'attn', 'o'), attn + 'o_proj'),
        **linear(('layers', 'mlp', 'gate_up'), packed_parts(LAYER + 'mlp.gate_up_proj', (inter, inter))),
        **linear(('layers', 'mlp', 'down'), LAYER + 'mlp.down_proj'),
    }


def _adjust(spec: ModelSpec, config: dict, path: str) -> ModelSpec:
    """Glm4Config rotates half of each head when config.json names no ``partial_rotary_factor``."""
    params = config.get('rope_scaling') or config.get('rope_parameters') or {}
    if 'partial_rotary_factor' in params or config.get('partial_rotary_factor') is not None:
        return spec
    return dataclasses.replace(spec, rope=dataclasses.replace(spec.rope, partial_rotary_factor=DEFAULT_PARTIAL_ROTARY))


FAMILIES = {'Glm4ForCausalLM': Family(Glm4, weight_map, partial_rotary=True, adjust_spec=_adjust)}
