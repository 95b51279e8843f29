"""The mixtures of experts (``layers/moe.py``, ``families/moe.py``): Qwen3-MoE (``norm_topk_prob``),
Qwen2-MoE (a shared expert behind a sigmoid gate, q/k/v biases) and Mixtral (a sliding window), on
tiny random float32 checkpoints made by transformers' own classes, which write one tensor per
expert as the published checkpoints do. At tp=1 and tp=2 (``family_harness.py``): greedy tokens
equal the PyTorch reference backend's for 32 new tokens on 4 prompts and a prefix-cached fifth,
last-position logits within 1e-4 of transformers'. The MoE block's routing and expert MLP (XLA's
grouped GEMMs, the per-choice gather, and the Pallas grouped-GEMM kernel) against a dense numpy
reference, on random inputs with experts that receive no tokens."""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file
from family_harness import WINDOW, check_the_window_matters, family_checks
from pallas_cases import KERNEL
from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

from lmdeploy_jax.checkpoint.errors import CheckpointError
from lmdeploy_jax.checkpoint.source import ModelSource
from lmdeploy_jax.messages import TurbomindEngineConfig
from lmdeploy_jax.models import load_model
from lmdeploy_jax.models.layers.moe import grouped_mlp, per_choice_mlp, route
from lmdeploy_jax.models.registry import UnsupportedArchitectureError
from lmdeploy_jax.parallel.rules import TP, param_spec

# Qwen3-MoE's 32 experts: a decode step of the 4-sequence batch (8 choices) gathers its experts'
# weights (layers.moe.gathers_weights), prefill runs the grouped GEMMs; Qwen2-MoE's 8 and Mixtral's
# 4 take the grouped GEMMs
FAMILIES = {
    'qwen3_moe': (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                  dict(vocab_size=300, moe_intermediate_size=64, num_experts=32, num_experts_per_tok=2,
                       norm_topk_prob=True)),
    'qwen2_moe': (Qwen2MoeConfig, Qwen2MoeForCausalLM,
                  dict(vocab_size=300, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                       shared_expert_intermediate_size=96)),
    'mixtral': (MixtralConfig, MixtralForCausalLM,
                dict(vocab_size=300, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
}


(families, jax_results, test_greedy_tokens_equal_the_reference,
 test_last_position_logits_match_transformers) = family_checks(FAMILIES)


def test_mixtral_window_matters(families):
    check_the_window_matters(families['mixtral'])


def test_dense_layers_among_the_experts_are_refused(families, tmp_path):
    """A Qwen3-MoE config with a dense layer (``mlp_only_layers``) is refused naming the field."""
    path = families['qwen3_moe']['path']
    config = json.loads(open(f'{path}/config.json').read())
    (tmp_path / 'config.json').write_text(json.dumps({**config, 'mlp_only_layers': [1]}))
    os.symlink(f'{path}/model.safetensors', tmp_path / 'model.safetensors')
    with pytest.raises(UnsupportedArchitectureError, match='mlp_only_layers'):
        load_model(ModelSource(str(tmp_path), str(tmp_path)), 'float32')


@pytest.mark.parametrize('name, expert', [('qwen3_moe', 'model.layers.2.mlp.experts.3.up_proj.weight'),
                                          ('mixtral', 'model.layers.2.block_sparse_moe.experts.3.w3.weight')])
def test_a_missing_expert_tensor_is_named(families, tmp_path, name, expert):
    """The checkpoints keep one tensor per expert (the published layout); one left out is named."""
    path = families[name]['path']
    tensors = load_file(f'{path}/model.safetensors')
    assert expert in tensors
    del tensors[expert]
    save_file(tensors, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
    os.symlink(f'{path}/config.json', tmp_path / 'config.json')
    with pytest.raises(CheckpointError, match=expert.replace('.', r'\.')):
        load_model(ModelSource(str(tmp_path), str(tmp_path)), 'float32')


def test_experts_split_inside_each_expert_over_the_mesh():
    """At tp=2 each device holds half of every expert: gate_up's rows, down's columns (one layer's
    shapes); the router and the shared expert's gate are replicated, the shared expert split as a
    dense MLP."""
    E, inter, hidden = 8, 64, 128
    assert param_spec(('layers', 'mlp', 'experts', 'gate_up'), (E, 2 * inter, hidden), 2) == P(None, TP, None)
    assert param_spec(('layers', 'mlp', 'experts', 'down'), (E, hidden, inter), 2) == P(None, None, TP)
    assert param_spec(('layers', 'mlp', 'router', 'w'), (E, hidden), 2) == P()
    assert param_spec(('layers', 'mlp', 'shared_gate_up', 'w'), (2 * inter, hidden), 2) == P(TP, None)
    assert param_spec(('layers', 'mlp', 'shared_down', 'w'), (hidden, inter), 2) == P(None, TP)
    assert param_spec(('layers', 'mlp', 'shared_expert_gate', 'w'), (1, hidden), 2) == P()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize('renormalize', [False, True])
def test_route_takes_the_top_k_softmax_probabilities(renormalize):
    rng = np.random.default_rng()
    logits = rng.standard_normal((9, 6)).astype(np.float32) * 3
    weights, experts = route(jnp.asarray(logits), 2, renormalize)
    probs = _softmax(logits.astype(np.float64))
    expected_experts = np.argsort(-probs, axis=-1)[:, :2]
    expected = np.take_along_axis(probs, expected_experts, -1)
    if renormalize:
        expected = expected / expected.sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(experts), expected_experts)
    np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-5)


def _dense_reference(x, experts, gate_up, down):
    """Each choice's expert MLP (silu), in float64, one token and expert at a time."""
    silu = lambda v: v / (1 + np.exp(-v))      # noqa: E731
    out = []
    for t, chosen in enumerate(experts):
        for e in chosen:
            gate, up = np.split(gate_up[e].astype(np.float64) @ x[t], 2)
            out.append(down[e].astype(np.float64) @ (silu(gate) * up))
    return np.stack(out)


# the grouped GEMMs through the Pallas kernel (``pallas_kernels.grouped_matmul``, interpreted on a CPU)
grouped_kernel_mlp = functools.partial(grouped_mlp, impl=KERNEL)


@pytest.mark.parametrize('mlp, chosen_from', [
    *((mlp, chosen) for mlp in (grouped_mlp, per_choice_mlp) for chosen in ((1, 4), (0, 2, 5), tuple(range(6)))),
    (grouped_kernel_mlp, (0, 2, 5))])
def test_expert_mlp_matches_a_dense_reference(mlp, chosen_from):
    """Tokens routed only among ``chosen_from`` of 6 experts (the others receive none; with two
    candidates each of them takes every token). The weights are three layers' stacked, as the
    layer passes them, the middle one used."""
    rng = np.random.default_rng()
    n, hidden, inter, E = 10, 16, 8, 6
    x = rng.standard_normal((n, hidden)).astype(np.float32)
    gate_up = rng.standard_normal((3, E, 2 * inter, hidden)).astype(np.float32) * 0.3
    down = rng.standard_normal((3, E, hidden, inter)).astype(np.float32) * 0.3
    experts = np.stack([rng.choice(chosen_from, 2, replace=False) for _ in range(n)]).astype(np.int32)
    ours = jax.jit(mlp, static_argnums=4)(x, experts, gate_up, down, jax.nn.silu, jnp.int32(1))
    np.testing.assert_allclose(np.asarray(ours), _dense_reference(x, experts, gate_up[1], down[1]), rtol=1e-4,
                               atol=1e-5)


def test_expert_parallelism_is_refused_naming_what_is_supported():
    """LMDeploy's ``ep``: 1 is taken; expert parallelism is not built, so any other value is
    refused saying the experts are split inside each expert over the tp devices."""
    assert TurbomindEngineConfig(tp=2, ep=1).ep == 1
    for ep in (2, 0, True):
        with pytest.raises(ValueError, match=r'ep must be 1 \(expert parallelism is not built: the experts are split '
                                             r'inside each expert over the tp devices\), got'):
            TurbomindEngineConfig(tp=2, ep=ep)
