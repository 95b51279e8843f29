"""Phi-3 / 3.5 / 4-mini (``Phi3ForCausalLM``) on the JAX engine: packed ``qkv_proj`` and
``gate_up_proj``, partial rotary dims with longrope, a sliding window in every layer.

- A tiny random float32 checkpoint made by transformers' ``Phi3ForCausalLM`` (half the head
  rotating, longrope switching to its long factors past position 64, a window of 8): at tp=1 and
  tp=2 (``family_harness.py``) the greedy tokens for 32 new tokens on 4 prompts (and a fifth from
  the prefix cache) equal the PyTorch reference's, last-position logits within 1e-4.
- Phi-3-mini's 96-wide heads (which the Pallas attention kernels do not take) with Phi-4-mini's
  0.75 rotary fraction, at tp=1 on the XLA reference kernels (as a GPU picks for these heads),
  checked the same way.
- config.json read as ``Phi3Config`` reads it: the top-level ``original_max_position_embeddings``,
  the legacy ``su`` rope type, no window unless ``sliding_window`` is set.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from family_harness import TINY, WINDOW, check_the_window_matters, family_checks
from transformers import Phi3Config, Phi3ForCausalLM
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from lmdeploy_jax.models.registry import family
from lmdeploy_jax.models.rope import cos_sin, inv_frequencies
from lmdeploy_jax.models.spec import spec_from_config

ORIGINAL = 64          # longrope's long factors from position 64 on: the decodes of the longer prompts
_rng = np.random.default_rng()


def _longrope(rotary_dim: int) -> dict:
    short, long = (1.0 + 3.0 * _rng.random((2, rotary_dim // 2))).tolist()
    return {'rope_type': 'longrope', 'rope_theta': 1000.0, 'partial_rotary_factor': 0.5,
            'short_factor': short, 'long_factor': long}


FAMILIES = {
    # head_dim 32 (hidden / heads), 16 of its dims rotating
    'phi3': (Phi3Config, Phi3ForCausalLM, dict(vocab_size=300, sliding_window=WINDOW, rope_parameters=_longrope(16),
                                               original_max_position_embeddings=ORIGINAL)),
}
# head_dim 96, 72 dims rotating, one KV head
HEAD_96 = dict(vocab_size=300, hidden_size=192, num_attention_heads=2, head_dim=96, num_key_value_heads=1,
               sliding_window=WINDOW, original_max_position_embeddings=ORIGINAL,
               rope_parameters={**_longrope(72), 'partial_rotary_factor': 0.75})


(families, jax_results, test_greedy_tokens_equal_the_reference,
 test_last_position_logits_match_transformers) = family_checks(
    FAMILIES, tp1_only={'phi3_96': (Phi3Config, Phi3ForCausalLM, HEAD_96)})


def test_the_window_changes_the_long_prompts_logits(families):
    check_the_window_matters(families['phi3'])


def _phi3_mini_128k(**fields) -> dict:
    """A Phi-3-mini-128k-style config.json (longrope factors inside ``rope_scaling``, the original
    context at the top level), scaled down."""
    rope = _longrope(32)
    del rope['partial_rotary_factor'], rope['rope_theta']
    config = dict(TINY, architectures=['Phi3ForCausalLM'], vocab_size=300, max_position_embeddings=4096,
                  original_max_position_embeddings=256, rope_theta=10000.0, rope_scaling=rope)
    config.pop('head_dim')
    return {**config, **fields}


@pytest.mark.parametrize('case', ['longrope', 'su', 'no top-level original', 'window'])
def test_config_is_read_as_phi3config_reads_it(case):
    """The engine's rope tables at positions past the original context, and its windows, equal
    those transformers' Phi3Config and Phi3RotaryEmbedding make of the same config.json."""
    config = _phi3_mini_128k()
    if case == 'su':
        config['rope_scaling'] = {**config['rope_scaling'], 'type': 'su'}
        del config['rope_scaling']['rope_type']
    elif case == 'no top-level original':
        del config['original_max_position_embeddings']
        config['max_position_embeddings'] = 16384
    elif case == 'window':
        config['sliding_window'] = 2047
    spec = spec_from_config(json.loads(json.dumps(config)), family('Phi3ForCausalLM'), 'Phi3ForCausalLM',
                            'float32', (), 'config.json')
    hf_config = Phi3Config(**{k: v for k, v in config.items() if k != 'architectures'})
    assert spec.sliding_windows == ((2047,) * TINY['num_hidden_layers'] if case == 'window' else ())
    positions = np.arange(4096, 4096 + 8, dtype=np.int32)[None]
    x = torch.zeros(1, 8, spec.head_dim)
    expected = Phi3RotaryEmbedding(hf_config)(x, torch.tensor(positions, dtype=torch.long))
    ours = cos_sin(inv_frequencies(spec.rope, spec.head_dim), positions, spec.rope)
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-5, atol=1e-5)
