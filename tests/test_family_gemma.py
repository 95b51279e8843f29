"""Gemma 2 and Gemma 3 (text) on the JAX engine against the PyTorch reference backend, each a tiny
random float32 checkpoint made by transformers' own class, with prompts longer than the sliding
window: sandwich norms stored as ``1 + w``, GeGLU, embeddings scaled by ``sqrt(hidden)``,
``query_pre_attn_scalar``; Gemma 2 with attention and final soft caps small enough to bite;
Gemma 3 with q/k norms and sliding layers rotated by a rope of their own (the global layers' is
linear-scaled with another base). At tp=1 and tp=2 (``family_harness.py``): greedy tokens equal
the reference's for 32 new tokens on 4 prompts and a prefix-cached fifth, last-position logits
within 1e-4 of transformers'."""
from __future__ import annotations

import json

import numpy as np
import pytest
from family_harness import TINY, WINDOW, check_the_window_matters, family_checks
from safetensors.numpy import load_file
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from lmdeploy_jax.checkpoint.errors import CheckpointError
from lmdeploy_jax.checkpoint.source import ModelSource
from lmdeploy_jax.models import load_model
from lmdeploy_jax.models.families.gemma import gemma3_ropes
from lmdeploy_jax.models.registry import UnsupportedArchitectureError, family
from lmdeploy_jax.models.spec import spec_from_config

GEMMA3_ROPES = {'full_attention': {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 100.0},
                'sliding_attention': {'rope_type': 'default', 'rope_theta': 10000.0}}
FAMILIES = {
    # layers 0 and 2 slide (transformers' default layer_types)
    'gemma2': (Gemma2Config, Gemma2ForCausalLM, dict(vocab_size=300, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                                     attn_logit_softcapping=3.0, final_logit_softcapping=8.0)),
    'gemma3': (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        vocab_size=300, sliding_window=WINDOW, query_pre_attn_scalar=24, rope_parameters=GEMMA3_ROPES,
        layer_types=['sliding_attention', 'full_attention', 'sliding_attention'])),
}


(families, jax_results, test_greedy_tokens_equal_the_reference,
 test_last_position_logits_match_transformers) = family_checks(FAMILIES)


@pytest.mark.parametrize('name', FAMILIES)
def test_the_window_changes_the_long_prompts_logits(families, name):
    check_the_window_matters(families[name])


def test_gemma_specs_are_read_as_transformers_reads_them(families):
    """The spec of each checkpoint: windows by layer type, the scale, caps, embedding scale, the
    norms stored as ``1 + w``; Gemma 3's sliding layers' rope."""
    specs = {}
    for name, (config_cls, _, extra) in FAMILIES.items():
        path = families[name]['path']
        model = load_model(ModelSource(path, path))
        config = config_cls(**{**TINY, **extra})
        spec = specs[name] = model.spec
        assert spec.sliding_windows == tuple(WINDOW if t == 'sliding_attention' else 0 for t in config.layer_types)
        assert spec.attention_scale == config.query_pre_attn_scalar ** -0.5
        assert (spec.attn_logit_softcap, spec.final_logit_softcap) == (config.attn_logit_softcapping,
                                                                       config.final_logit_softcapping)
        assert spec.embed_scale == config.hidden_size ** 0.5 and spec.hidden_act == 'gelu_pytorch_tanh'
        tensors = load_file(f'{path}/model.safetensors')
        np.testing.assert_array_equal(np.asarray(model.module().layers.pre_mlp_norm.weight[1]),
                                      tensors['model.layers.1.pre_feedforward_layernorm.weight'] + np.float32(1))
    gemma3 = specs['gemma3']
    assert specs['gemma2'].local_rope is None
    assert (gemma3.rope.rope_type, gemma3.rope.theta, gemma3.rope.factor) == ('linear', 100.0, 2.0)
    assert (gemma3.local_rope.rope_type, gemma3.local_rope.theta) == ('default', 10000.0)


def test_gemma3_ropes_of_older_configs_match_transformers():
    """An older config.json's ``rope_scaling``, ``rope_theta`` and ``rope_local_base_freq`` (or their
    absence) give the per-layer-type rope parameters Gemma3TextConfig makes of them; a
    ``rope_parameters`` not keyed by layer type is refused."""
    legacy = [{}, {'rope_theta': 5e5, 'rope_local_base_freq': 2e4},
              {'rope_scaling': {'rope_type': 'linear', 'factor': 8.0}, 'rope_local_base_freq': 1e4}]
    for fields in legacy:
        config = Gemma3TextConfig(num_hidden_layers=2, **fields)
        assert gemma3_ropes(fields, 'c.json') == {t: dict(v) for t, v in config.rope_parameters.items()}
        assert gemma3_ropes(json.loads(config.to_json_string()), 'c.json') == config.rope_parameters
    with pytest.raises(CheckpointError, match="'rope_parameters' must map"):
        gemma3_ropes({'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e4}}, 'c.json')


def test_bidirectional_attention_is_refused(families):
    """A Gemma 3 config with ``use_bidirectional_attention`` (an embedding model) is not run causally."""
    config = json.loads(open(f"{families['gemma3']['path']}/config.json").read())
    with pytest.raises(UnsupportedArchitectureError, match='use_bidirectional_attention'):
        spec_from_config({**config, 'use_bidirectional_attention': True}, family('Gemma3ForCausalLM'),
                         'Gemma3ForCausalLM', 'float32', (), 'c.json')
