"""The mixtures of experts (``layers/moe.py``, ``families/moe.py``): Qwen3-MoE (``norm_topk_prob``),
Qwen2-MoE (a shared expert behind a sigmoid gate, q/k/v biases) and Mixtral (a sliding window), on
tiny random float32 checkpoints made by transformers' own classes, which write one tensor per
expert as the published checkpoints do. At tp=1, tp=2 (experts split inside each expert) and, for
Qwen3-MoE and Mixtral, tp=2 with ep=2 (each device holding half the experts whole; its logits from
weights swapped in by ``update_weights``; ``family_harness.py``): greedy tokens
equal the PyTorch reference backend's for 32 new tokens on 4 prompts and a prefix-cached fifth,
last-position logits within 1e-4 of transformers'. The MoE block's routing and expert MLP (XLA's
grouped GEMMs, the per-choice gather, and the Pallas grouped-GEMM kernel) against a dense numpy
reference, on random inputs with experts that receive no tokens, whole and split over devices by
expert; ``ep``'s refusals at model load."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys

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
from lmdeploy_jax.models import load_model
from lmdeploy_jax.models.layers.fused import FusedLayout
from lmdeploy_jax.models.layers.moe import experts_mlp, grouped_mlp, local_choices, per_choice_mlp, route
from lmdeploy_jax.models.loader import model_spec
from lmdeploy_jax.models.registry import UnsupportedArchitectureError
from lmdeploy_jax.models.safetensors_file import SafetensorsCheckpoint
from lmdeploy_jax.parallel.rules import TP, param_spec, splits_by_expert
from test_tensor_parallel import _env

from convert import convert

# Qwen3-MoE's 32 experts: a decode step of the 4-sequence batch (8 choices) gathers its experts'
# weights (layers.moe.gathers_weights), prefill runs the grouped GEMMs; Qwen2-MoE's 8 and Mixtral's
# 4 take the grouped GEMMs. Qwen3-MoE and Mixtral also run at tp=2, ep=2 in the tp=2 child (Qwen2-MoE's
# shared expert is split as at ep=1, and each engine start costs CI time).
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
 test_last_position_logits_match_transformers) = family_checks(FAMILIES, expert_parallel=('qwen3_moe', 'mixtral'))


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


def test_experts_split_whole_under_expert_parallelism():
    """With ``expert_parallel`` each device holds E / tp whole experts: gate_up and down split on
    the experts' axis, each expert's gate_up rows in one device's order (gate, then up); the
    router, the shared expert and the attention are placed as without it."""
    E, inter, hidden = 8, 64, 128
    for leaf, shape in (('gate_up', (E, 2 * inter, hidden)), ('down', (E, hidden, inter))):
        assert param_spec(('layers', 'mlp', 'experts', leaf), shape, 2, True) == P(TP, None, None)
    for leaf, shape in (('router', (E, hidden)), ('shared_gate_up', (2 * inter, hidden)),
                        ('shared_down', (hidden, inter)), ('shared_expert_gate', (1, hidden)), ('qkv', (512, hidden))):
        path = ('layers', 'mlp' if leaf != 'qkv' else 'attn', leaf, 'w')
        assert param_spec(path, shape, 2, True) == param_spec(path, shape, 2)


def test_expert_parallel_layout_keeps_each_experts_rows_whole(families):
    """Under expert parallelism the experts' fused gate_up keeps one device's row order (so the
    loader, an engine checkpoint's restore and ``update_weights`` place it as it is), while qkv and
    the shared expert's gate_up stay grouped shard by shard."""
    path = families['qwen2_moe']['path']
    with SafetensorsCheckpoint(path) as ckpt:
        spec = model_spec(ModelSource(path, path), ckpt)
    whole = dataclasses.replace(spec, expert_parallel=True)
    assert FusedLayout(whole, 2).segments('gate_up') == FusedLayout(spec).segments('gate_up') == [
        (0, 0, spec.intermediate_size), (1, 0, spec.intermediate_size)]
    assert FusedLayout(spec, 2).shards('gate_up') == 2
    for key in ('qkv', 'shared_gate_up'):
        sharded = FusedLayout(spec, 2).segments(key)
        assert FusedLayout(whole, 2).segments(key) == sharded != FusedLayout(spec).segments(key)


PLACED_BY_EXPERT = """
import sys
import numpy as np
from flax import nnx
from flax.nnx import traversals
from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.models import load_model
from lmdeploy_jax.parallel import make_tp_mesh
hf, converted = sys.argv[1:]
flat = lambda model: traversals.flatten_mapping(nnx.to_pure_dict(model.params))
one = flat(load_model(resolve_model(hf)))
models = [load_model(resolve_model(p), mesh=make_tp_mesh(2), ep=2) for p in (hf, converted)]
assert all(m.spec.expert_parallel for m in models)
a, b = map(flat, models)
assert a.keys() == b.keys() == one.keys()
for path in a:
    assert a[path].sharding.is_equivalent_to(b[path].sharding, a[path].ndim), path
    for sa, sb in zip(a[path].addressable_shards, b[path].addressable_shards):
        assert sa.device == sb.device and sa.index == sb.index, path
        assert np.array_equal(np.asarray(sa.data), np.asarray(sb.data)), path
        if 'experts' in path:       # [layers, E, ...]: each device half of the experts, whole
            layers, experts, *rest = one[path].shape
            assert sa.data.shape == (layers, experts // 2, *rest), path
            np.testing.assert_array_equal(np.asarray(sa.data), np.asarray(one[path])[sa.index])
print(f'{len(a)} parameters equal shard by shard')
"""


def test_expert_parallel_load_and_restore_place_whole_experts(families, tmp_path):
    """At tp=2, ep=2 the Hugging Face directory and its engine checkpoint (``convert``, written at
    tp=1, restored by Orbax) load into the same shards, each device holding half of the experts,
    whole (Qwen2-MoE: a shared expert beside them)."""
    hf = families['qwen2_moe']['path']
    converted = convert(hf, str(tmp_path / 'engine'))
    proc = subprocess.run([sys.executable, '-c', PLACED_BY_EXPERT, hf, converted], env=_env(tmp_path, 2),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'parameters equal shard by shard' in proc.stdout


@pytest.mark.parametrize('ep, tp, experts, message', [
    (2, 4, 8, r'^ep=2 is not supported with tp=4: ep must be 1 \(each expert split over the tp devices\) or equal '
              r'to tp \(each device holding num_experts / tp whole experts\)$'),
    (2, 2, 0, r'^ep=2: the model is not a mixture of experts; expert parallelism needs experts \(use ep=1\)$'),
    (4, 4, 6, r'^ep=4 cannot split 6 experts evenly over the devices \(use ep=1\)$')])
def test_expert_parallelism_the_model_cannot_take_is_refused_naming_ep(ep, tp, experts, message):
    """What ``load_model`` refuses for ``ep`` (``TurbomindEngineConfig`` already refuses ep neither 1
    nor tp): a dense model (TurboMind would run its MLP unsplit; we do not build that), experts
    ``ep`` does not divide."""
    with pytest.raises(ValueError, match=message):
        splits_by_expert(ep, tp, experts)
    assert splits_by_expert(1, tp, experts) is False
    assert splits_by_expert(2, 2, 8) is True


@pytest.mark.parametrize('mlp', [grouped_mlp, per_choice_mlp, grouped_kernel_mlp])
def test_devices_holding_whole_experts_sum_to_the_whole_mlp(mlp):
    """Two devices each holding 3 of 6 experts (``local_choices``): each device's result counts only
    its own experts' choices (another's come out as zeros from the grouped GEMMs, and carry zero
    weight), and the two shares sum to the routed MLP of all 6 experts."""
    rng = np.random.default_rng()
    n, k, hidden, inter, E, ep = 10, 2, 16, 8, 6, 2
    x = rng.standard_normal((n, hidden)).astype(np.float32)
    gate_up = rng.standard_normal((3, E, 2 * inter, hidden)).astype(np.float32) * 0.3
    down = rng.standard_normal((3, E, hidden, inter)).astype(np.float32) * 0.3
    experts = np.stack([rng.choice(E, k, replace=False) for _ in range(n)]).astype(np.int32)
    weights = rng.uniform(0.1, 1, (n, k)).astype(np.float32)
    per_choice = _dense_reference(x, experts, gate_up[1], down[1]).reshape(n, k, hidden)
    local_e = E // ep
    total = 0
    for first in range(0, E, local_e):
        own_weights, own_experts = local_choices(jnp.asarray(weights), jnp.asarray(experts), jnp.int32(first), local_e)
        mine = (experts >= first) & (experts < first + local_e)
        np.testing.assert_array_equal(np.asarray(own_weights), np.where(mine, weights, 0))
        np.testing.assert_array_equal(np.asarray(own_experts), np.where(mine, experts - first, local_e))
        stacks = gate_up[:, first:first + local_e], down[:, first:first + local_e]
        y = np.asarray(jax.jit(mlp, static_argnums=4)(x, own_experts, *stacks, jax.nn.silu, jnp.int32(1)))
        y = y.reshape(n, k, hidden)
        np.testing.assert_allclose(y[mine], per_choice[mine], rtol=1e-4, atol=1e-5)
        if mlp is not per_choice_mlp:
            assert not y[~mine].any()
        share = experts_mlp(jnp.asarray(x), jnp.asarray(weights), jnp.asarray(experts), *map(jnp.asarray, stacks),
                            jax.nn.silu, jnp.int32(1), jnp.int32(first))
        total = total + np.asarray(share, np.float64)
    np.testing.assert_allclose(total, np.einsum('nkh,nk->nh', per_choice, weights), rtol=1e-4, atol=1e-5)
