"""Model families on the JAX engine against the PyTorch reference backend: Mistral (a sliding window
in every layer), Qwen2 (sliding layers from ``max_window_layers``), Qwen3 (q/k norms, explicit
head_dim, sliding layers from ``layer_types``) and Llama 3.2 (tied embeddings, llama3 rope), each a
tiny random float32 checkpoint made by transformers' own class, with prompts longer than the
window. At tp=1 and tp=2 (``family_harness.py``): the engine's greedy tokens for 32 new tokens on 4
prompts equal the reference's, a fifth request that reuses the prefix cache past the window too,
and the decoder's last-position logits are within 1e-4 of transformers'.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from family_harness import TINY, WINDOW, check_the_window_matters, family_checks
from safetensors.numpy import load_file, save_file
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from lmdeploy_jax.checkpoint.errors import CheckpointError
from lmdeploy_jax.checkpoint.source import ModelSource
from lmdeploy_jax.models import load_model
from lmdeploy_jax.models.loader import check_checkpoint
from lmdeploy_jax.models.spec import LAYER_TYPES, sliding_windows

LLAMA32_ROPE = {'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 4.0, 'low_freq_factor': 1.0,
                'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}
FAMILIES = {
    # one KV head: tp=2 repeats it
    'mistral': (MistralConfig, MistralForCausalLM, dict(vocab_size=300, num_key_value_heads=1, sliding_window=WINDOW)),
    # layers 1 and 2 slide, layer 0 is global; q/k/v biases
    'qwen2': (Qwen2Config, Qwen2ForCausalLM, dict(vocab_size=300, use_sliding_window=True, sliding_window=WINDOW,
                                                  max_window_layers=1)),
    # head_dim 64 is not hidden / heads; layers 0 and 2 slide
    'qwen3': (Qwen3Config, Qwen3ForCausalLM, dict(vocab_size=300, head_dim=64, use_sliding_window=True,
                                                  sliding_window=WINDOW, layer_types=[
                                                      'sliding_attention', 'full_attention', 'sliding_attention'])),
    # an odd vocabulary: tp=2 keeps the tied embedding whole
    'llama3.2': (LlamaConfig, LlamaForCausalLM, dict(vocab_size=301, tie_word_embeddings=True,
                                                     rope_parameters=LLAMA32_ROPE)),
}


(families, jax_results, test_greedy_tokens_equal_the_reference,
 test_last_position_logits_match_transformers) = family_checks(FAMILIES)


@pytest.mark.parametrize('name', ['mistral', 'qwen2', 'qwen3'])
def test_the_window_changes_the_long_prompts_logits(families, name):
    check_the_window_matters(families[name])


def test_qwen3_q_k_norms_are_loaded_and_required(families, tmp_path):
    """Qwen3's per-head norm weights are stacked ``[layers, head_dim]``; a checkpoint without one
    is refused, naming the tensor."""
    path = families['qwen3']['path']
    model = load_model(ModelSource(path, path))
    assert model.spec.qk_norm and model.spec.sliding_windows == (WINDOW, 0, WINDOW)
    head_dim = FAMILIES['qwen3'][2]['head_dim']
    attn = model.module().layers.attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (TINY['num_hidden_layers'], head_dim)
    tensors = load_file(f'{path}/model.safetensors')
    np.testing.assert_array_equal(np.asarray(attn.k_norm.weight[1]), tensors['model.layers.1.self_attn.k_norm.weight'])
    del tensors['model.layers.1.self_attn.k_norm.weight']
    save_file(tensors, str(tmp_path / 'model.safetensors'))
    shutil.copy(f'{path}/config.json', tmp_path)
    with pytest.raises(CheckpointError, match="'model.layers.1.self_attn.k_norm.weight' is missing"):
        check_checkpoint(ModelSource(str(tmp_path), str(tmp_path)))


def _transformers_windows(config) -> tuple[int, ...]:
    windows = tuple(config.sliding_window if t == 'sliding_attention' else 0 for t in config.layer_types)
    return windows if any(windows) else ()


def test_sliding_windows_are_read_as_transformers_reads_them(rng):
    """Qwen2/Qwen3's windows from random ``use_sliding_window``, ``max_window_layers`` and
    ``layer_types`` against transformers' configs; Mistral's in every layer, its ``layer_types``
    ignored; Llama has none; malformed fields are named."""
    for config_cls in (Qwen2Config, Qwen3Config):
        for _ in range(20):
            layers = int(rng.integers(1, 7))
            fields = dict(num_hidden_layers=layers, use_sliding_window=bool(rng.random() < 0.7),
                          sliding_window=int(rng.integers(1, 64)), max_window_layers=int(rng.integers(0, 8)))
            if rng.random() < 0.5 and fields['use_sliding_window']:
                fields['layer_types'] = [LAYER_TYPES[int(b)] for b in rng.random(layers) < 0.5]
            config = json.loads(config_cls(**fields).to_json_string())      # as save_pretrained writes it
            assert sliding_windows(config, 'per_layer', layers, 'c.json') == _transformers_windows(config_cls(**fields))
            # an older config.json without layer_types: max_window_layers decides, as in transformers
            config.pop('layer_types', None)
            fields.pop('layer_types', None)
            assert sliding_windows(config, 'per_layer', layers, 'c.json') == _transformers_windows(config_cls(**fields))
    mistral = {'sliding_window': 5, 'layer_types': ['full_attention'] * 3}
    assert sliding_windows(mistral, 'all_layers', 3, 'c.json') == (5, 5, 5)
    assert sliding_windows({}, 'all_layers', 2, 'c.json') == (MistralConfig().sliding_window,) * 2
    assert sliding_windows({'sliding_window': None}, 'all_layers', 2, 'c.json') == ()
    assert sliding_windows({'sliding_window': 5}, None, 2, 'c.json') == ()
    bad = [({'sliding_window': 0}, "'sliding_window' must be a positive integer"),
           ({'use_sliding_window': True, 'layer_types': ['full_attention']}, "'layer_types' must list"),
           ({'use_sliding_window': True, 'layer_types': ['full_attention', 'chunked']}, "'layer_types' must list"),
           ({'layer_types': ['sliding_attention', 'full_attention']}, 'no window')]
    for config, message in bad:
        with pytest.raises(CheckpointError, match=message):
            sliding_windows(config, 'per_layer', 2, 'c.json')
