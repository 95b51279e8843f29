"""InternLM2 / 2.5 and InternLM3: the Llama decoder under InternLM's names.

InternLM2 (``InternLM2ForCausalLM``, published as remote code, ``modeling_internlm2.py``) names its
modules ``tok_embeddings``, ``attention.wqkv`` / ``attention.wo``, ``feed_forward.w1`` (gate) /
``w3`` (up) / ``w2`` (down), ``attention_norm``, ``ffn_norm`` and ``output``, and packs q/k/v in
one ``wqkv`` grouped by KV head: its rows are ``[kv_heads, q_per_kv + 2, head_dim]``, each group
its ``q_per_kv`` query heads, then its key head, then its value head (LMDeploy's ``'hgd'``
layout). Its config's ``bias`` gives ``wqkv`` and ``wo`` biases (the MLP has none); the weight map
reads them wherever the checkpoint has them. ``rope_scaling`` (``dynamic`` or ``linear``, with
``type`` and ``factor``) is read as for Llama (``spec.rope_from_config``).

InternLM3 (``InternLM3ForCausalLM``) keeps Llama's names and layout; its ``qkv_bias`` (q/k/v) and
``bias`` (o and the MLP) flags are, again, followed by the checkpoint's tensors.
"""
from __future__ import annotations

import numpy as np

from ..family import Family
from ..layers.decoder import CausalLM
from ..spec import ModelSpec
from ..weight_map import Part, Path, Source, Tensor, linear
from .llama import weight_map as llama_weight_map

LAYER = 'model.layers.{i}.'


def grouped_qkv_rows(num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of q, k and v (each in head order, ``head_dim`` rows a head) in a ``wqkv`` of
    ``(num_heads + 2 * num_kv_heads) * head_dim`` rows laid out ``[kv_heads, q_per_kv + 2, head_dim]``:
    query head ``h`` sits in group ``h // q_per_kv`` at slot ``h % q_per_kv``, KV head ``g``'s key
    at slot ``q_per_kv`` and its value at ``q_per_kv + 1`` of group ``g``."""
    q_per_kv = num_heads // num_kv_heads
    dims = np.arange(head_dim)

    def rows(groups: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return (((groups * (q_per_kv + 2) + slots) * head_dim)[:, None] + dims).reshape(-1)

    heads, kv = np.arange(num_heads), np.arange(num_kv_heads)
    return (rows(heads // q_per_kv, heads % q_per_kv), rows(kv, np.full_like(kv, q_per_kv)),
            rows(kv, np.full_like(kv, q_per_kv + 1)))


def internlm2_weight_map(spec: ModelSpec) -> dict[Path, Source]:
    """InternLM2's names; ``wqkv``'s scattered rows by ``grouped_qkv_rows``."""
    d = spec.head_dim
    total = (spec.num_heads + 2 * spec.num_kv_heads) * d
    wqkv = LAYER + 'attention.wqkv.weight'
    qkv = tuple(Part(wqkv, rows, total) for rows in grouped_qkv_rows(spec.num_heads, spec.num_kv_heads, d))
    ffn = LAYER + 'feed_forward.'
    return {
        ('embed',): Tensor('model.tok_embeddings.weight'),
        ('norm', 'weight'): Tensor('model.norm.weight'),
        **linear(('lm_head',), 'output'),
        ('layers', 'input_norm', 'weight'): Tensor(LAYER + 'attention_norm.weight'),
        ('layers', 'post_norm', 'weight'): Tensor(LAYER + 'ffn_norm.weight'),
        **linear(('layers', 'attn', 'qkv'), qkv),
        **linear(('layers', 'attn', 'o'), LAYER + 'attention.wo'),
        **linear(('layers', 'mlp', 'gate_up'), (ffn + 'w1', ffn + 'w3')),
        **linear(('layers', 'mlp', 'down'), ffn + 'w2'),
    }


FAMILIES = {
    'InternLM2ForCausalLM': Family(CausalLM, internlm2_weight_map),
    'InternLM3ForCausalLM': Family(CausalLM, llama_weight_map),
}
