"""Phi-3 / 3.5 / 4-mini (``Phi3ForCausalLM``): the Llama decoder with q/k/v packed in one
``qkv_proj`` (q rows, then k, then v) and gate/up in one ``gate_up_proj`` (gate rows, then up),
rotary embedding on the first ``partial_rotary_factor`` of each head (Phi-4-mini: 0.75), longrope.

Its config as ``Phi3Config`` reads it (``read_config``):

- ``sliding_window``: when set, every layer attends within it (Phi-3-mini-4k: 2047); absent or
  null, none does (unlike Mistral, whose absent window defaults to 4096).
- longrope's ``original_max_position_embeddings`` is the top-level field, which wins over the one
  inside ``rope_scaling`` (4096 when config.json has neither); the legacy rope types ``su`` and
  ``yarn`` are longrope.

Phi-3-mini's heads are 96 wide: the Pallas attention kernels take power-of-two heads only, so on a
GPU the engine's automatic choice runs those models' attention and KV writes with the XLA
reference ops (``pallas_kernels._dispatch.choose_impl``).
"""
from __future__ import annotations

from ..family import Family
from ..layers.decoder import CausalLM
from ..spec import ModelSpec
from ..weight_map import Path, Source, Tensor, linear, packed_parts

LAYER = 'model.layers.{i}.'
ORIGINAL_MAX_POSITIONS = 4096        # Phi3Config's original_max_position_embeddings
LONGROPE_ALIASES = ('su', 'yarn', 'longrope')


def weight_map(spec: ModelSpec) -> dict[Path, Source]:
    """Hugging Face's Phi-3 names; the packed tensors' parts by row range."""
    attn, mlp = LAYER + 'self_attn.', LAYER + 'mlp.'
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return {
        ('embed',): Tensor('model.embed_tokens.weight'),
        ('norm', 'weight'): Tensor('model.norm.weight'),
        **linear(('lm_head',), 'lm_head'),
        ('layers', 'input_norm', 'weight'): Tensor(LAYER + 'input_layernorm.weight'),
        ('layers', 'post_norm', 'weight'): Tensor(LAYER + 'post_attention_layernorm.weight'),
        **linear(('layers', 'attn', 'qkv'), packed_parts(attn + 'qkv_proj.weight', (q, kv, kv))),
        **linear(('layers', 'attn', 'o'), attn + 'o_proj'),
        **linear(('layers', 'mlp', 'gate_up'),
                 packed_parts(mlp + 'gate_up_proj.weight', (spec.intermediate_size,) * 2)),
        **linear(('layers', 'mlp', 'down'), mlp + 'down_proj'),
    }


def read_config(config: dict) -> dict:
    """``config`` with Phi3Config's readings made explicit (the module docstring lists them)."""
    config = {'sliding_window': None, **config}
    params = config.get('rope_scaling') or config.get('rope_parameters')
    if not isinstance(params, dict) or (params.get('rope_type') or params.get('type')) not in LONGROPE_ALIASES:
        return config
    original = config.get('original_max_position_embeddings', ORIGINAL_MAX_POSITIONS)
    params = {**params, 'rope_type': 'longrope', 'original_max_position_embeddings': original}
    params.pop('type', None)
    return {**config, 'rope_scaling': params}


FAMILIES = {
    'Phi3ForCausalLM': Family(CausalLM, weight_map, sliding_window='all_layers', partial_rotary=True,
                              read_config=read_config),
}
