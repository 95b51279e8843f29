"""GLM-4-0414 (``Glm4ForCausalLM``) on the JAX engine against the PyTorch reference backend, a tiny
random float32 checkpoint made by transformers' own class: sandwich norms, q/k/v biases, the packed
``gate_up_proj``, and half of each head rotated by interleaved pairs (the engine loads q and k
permuted for its rotate-half rope). At tp=1 and tp=2 (``family_harness.py``): greedy tokens equal
the reference's for 32 new tokens on 4 prompts and a prefix-cached fifth, last-position logits
within 1e-4 of transformers'."""
from __future__ import annotations

import numpy as np
from family_harness import family_checks
from safetensors.numpy import load_file
from transformers import Glm4Config, Glm4ForCausalLM

from lmdeploy_jax.checkpoint.source import ModelSource
from lmdeploy_jax.models import load_model
from lmdeploy_jax.models.families.glm4 import interleaved_to_halves

# Glm4Config's defaults: q/k/v biases, partial_rotary_factor 0.5 (16 of head_dim 32)
FAMILIES = {'glm4': (Glm4Config, Glm4ForCausalLM, dict(vocab_size=300))}


(families, jax_results, test_greedy_tokens_equal_the_reference,
 test_last_position_logits_match_transformers) = family_checks(FAMILIES)


def test_q_k_rows_and_biases_are_permuted_v_and_packed_gate_up_are_not(families):
    """Within each head's 16 rotary dims q and k (weights and biases) are loaded even dims first,
    then odd, the other dims and v as stored; gate and up are the halves of ``gate_up_proj``."""
    path = families['glm4']['path']
    model = load_model(ModelSource(path, path))
    spec, layers = model.spec, model.module().layers
    assert spec.rope.partial_rotary_factor == 0.5 and {'qkv'} <= spec.biases
    order = interleaved_to_halves(1, 32, 16)
    assert order.tolist() == [*range(0, 16, 2), *range(1, 16, 2), *range(16, 32)]
    t = load_file(f'{path}/model.safetensors')
    q_rows, k_rows = spec.num_heads * 32, spec.num_kv_heads * 32
    qkv_w, qkv_b = np.asarray(layers.attn.qkv.w[2]), np.asarray(layers.attn.qkv.b[2])
    attn = 'model.layers.2.self_attn.'
    rows = interleaved_to_halves(spec.num_heads, 32, 16)
    np.testing.assert_array_equal(qkv_w[:q_rows], t[attn + 'q_proj.weight'][rows])
    np.testing.assert_array_equal(qkv_b[:q_rows], t[attn + 'q_proj.bias'][rows])
    kv_rows = interleaved_to_halves(spec.num_kv_heads, 32, 16)
    np.testing.assert_array_equal(qkv_b[q_rows:q_rows + k_rows], t[attn + 'k_proj.bias'][kv_rows])
    np.testing.assert_array_equal(qkv_w[q_rows + k_rows:], t[attn + 'v_proj.weight'])
    np.testing.assert_array_equal(np.asarray(layers.mlp.gate_up.w[2]), t['model.layers.2.mlp.gate_up_proj.weight'])
