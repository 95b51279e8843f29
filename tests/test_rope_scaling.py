"""RoPE scaling (linear, dynamic NTK, yarn, llama3, longrope) and partial rotary dims against
transformers: the inverse frequencies and attention factors of fresh random configs against
``ROPE_INIT_FUNCTIONS``, the cos/sin tables of a request's forward calls against transformers'
rotary embedding module, the partial rotation against Phi-3's, a Phi-3 (longrope, partial) model's
logits through the engine's decoder, and the JAX engine's greedy tokens against the reference
backend's on a tiny Llama, with prompts and generations that cross the lengths where dynamic and
longrope change their frequencies."""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_engine_helpers import run_all
from test_models import PagedRun, _assert_logits_close
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply_rotary_pos_emb

from lmdeploy_jax.backends import check_supported, create_backend
from lmdeploy_jax.checkpoint.source import ModelSource, resolve_model
from lmdeploy_jax.engine import JaxEngine
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig
from lmdeploy_jax.models import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, load_model
from lmdeploy_jax.models.layers.attention import _rope_before_the_op
from lmdeploy_jax.models.layers.fused import FusedLayout, join_fused, split_fused
from lmdeploy_jax.models.rope import apply_rope, cos_sin, inv_frequencies, rotary_dim
from lmdeploy_jax.models.spec import ModelSpec, RopeSpec, dynamic_ntk, rope_from_config
from lmdeploy_jax.pytorch.engine import PytorchEngine

SCALED_TYPES = ('linear', 'dynamic', 'yarn', 'llama3', 'longrope')
# transformers renamed ``past_key_values`` to ``cache`` (5.2x)
CACHE_KWARG = 'cache' if 'cache' in inspect.signature(Phi3ForCausalLM.forward).parameters else 'past_key_values'


def random_rope_parameters(rng, rope_type: str, dim: int, max_positions: int) -> dict:
    """Fresh rope parameters of ``rope_type`` for ``dim`` rotated dims, optional keys sometimes set."""
    original = int(rng.integers(8, max_positions))
    params = {'rope_type': rope_type, 'rope_theta': float(rng.uniform(500, 1e6))}
    maybe = rng.random(4) < 0.5
    if rope_type in ('linear', 'dynamic'):
        params['factor'] = float(rng.uniform(1.0, 8.0))
    elif rope_type == 'llama3':
        low = float(rng.uniform(0.5, 2.0))
        params.update(factor=float(rng.uniform(2.0, 16.0)), low_freq_factor=low,
                      high_freq_factor=low + float(rng.uniform(1.0, 4.0)), original_max_position_embeddings=original)
    elif rope_type == 'yarn':
        params.update(factor=float(rng.uniform(1.5, 16.0)), original_max_position_embeddings=original)
        if maybe[0]:
            params.update(beta_fast=float(rng.uniform(16, 64)), beta_slow=float(rng.uniform(0.5, 2)))
        if maybe[1]:
            params.update(mscale=float(rng.uniform(0.5, 1.5)), mscale_all_dim=float(rng.uniform(0.5, 1.5)))
        elif maybe[2]:
            params['attention_factor'] = float(rng.uniform(0.8, 1.5))
        if maybe[3]:
            params['truncate'] = False
    elif rope_type == 'longrope':
        params.update(short_factor=rng.uniform(1.0, 2.0, dim // 2).tolist(),
                      long_factor=rng.uniform(1.0, 16.0, dim // 2).tolist(), original_max_position_embeddings=original)
        if maybe[0]:
            params['factor'] = float(rng.uniform(1.0, 8.0))
        if maybe[1]:
            params['attention_factor'] = float(rng.uniform(0.8, 1.5))
    return params


def random_config(rng, rope_type: str, partial: bool) -> dict:
    """A raw config.json-style dict: heads, head_dim, max_position_embeddings and rope parameters."""
    head_dim = int(rng.choice([16, 32, 64]))
    factor = float(rng.choice([0.25, 0.5, 0.75])) if partial else 1.0
    max_positions = int(rng.integers(24, 96))
    params = random_rope_parameters(rng, rope_type, int(head_dim * factor), max_positions)
    if partial:
        params['partial_rotary_factor'] = factor
    return dict(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                max_position_embeddings=max_positions, rope_scaling=params)


def hf_rotary(config: dict):
    """transformers' rotary embedding for ``config``: Llama's module (every type; it computes the
    tables of partial dims too), Phi-3's for the default type with partial dims (Llama's default
    ignores the partial factor)."""
    if config['rope_scaling']['rope_type'] == 'default':
        return Phi3RotaryEmbedding(Phi3Config(**config))
    return LlamaRotaryEmbedding(LlamaConfig(**config))


def blend_condition(params: dict) -> float:
    """How much llama3's smooth blend can magnify a last-bit difference in a base frequency (numpy's
    and torch's float32 ``pow`` may round apart): the blend weight is ``old_len / wavelen - low``
    over ``high - low``, so near its low end a relative error grows by up to ``factor * low /
    (high - low)``. 1 for every other type."""
    if params['rope_type'] != 'llama3':
        return 1.0
    return 1.0 + params['factor'] * params['low_freq_factor'] / (
        params['high_freq_factor'] - params['low_freq_factor'])


def request_calls(rng, threshold: int) -> list[np.ndarray]:
    """The positions of a request's forward calls as the reference makes them: the prompt in one
    call, then one call per generated token; the prompt ends near ``threshold``, so its calls cross it."""
    prompt = int(rng.integers(max(1, threshold - 4), threshold + 4))
    return [np.arange(prompt)] + [np.array([p]) for p in range(prompt, prompt + 6)]


@pytest.mark.parametrize('rope_type, partial', [(t, False) for t in SCALED_TYPES]
                         + [(t, True) for t in ('default',) + SCALED_TYPES])
def test_frequencies_and_tables_match_transformers(rng, rope_type, partial):
    for _ in range(3):
        config = random_config(rng, rope_type, partial)
        rope = rope_from_config(config, 'Phi3ForCausalLM', partial_rotary=True)
        head_dim = config['head_dim']
        ours = inv_frequencies(rope, head_dim)
        module = hf_rotary(config)
        if rope_type == 'default':
            ref, factor = module.compute_default_rope_parameters(module.config)
        else:
            ref, factor = ROPE_INIT_FUNCTIONS[rope_type](module.config)
        assert ours.dtype == np.float32 and ours.shape == (rotary_dim(rope, head_dim) // 2,)
        np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6 * blend_condition(config['rope_scaling']))
        assert rope.attention_factor == pytest.approx(factor, rel=1e-12)

        threshold = (config['max_position_embeddings'] if rope_type == 'dynamic'
                     else config['rope_scaling'].get('original_max_position_embeddings', 16))
        calls = request_calls(rng, threshold)
        # all calls as the rows of one step (padding positions 0): each row's length is its own
        width = max(map(len, calls))
        positions = np.zeros((len(calls), width), np.int32)
        for i, call in enumerate(calls):
            positions[i, :len(call)] = call
        cos, sin = map(np.asarray, cos_sin(ours, jnp.asarray(positions), rope))
        for i, call in enumerate(calls):
            ref_cos, ref_sin = module(torch.zeros(1), torch.tensor(call[None]))
            np.testing.assert_allclose(cos[i, :len(call)], ref_cos[0].numpy(), rtol=0, atol=3e-5)
            np.testing.assert_allclose(sin[i, :len(call)], ref_sin[0].numpy(), rtol=0, atol=3e-5)


def test_partial_rotation_matches_phi3(rng):
    head_dim, rotary = 24, 16
    q = rng.standard_normal((2, 5, 3, head_dim)).astype(np.float32)     # [B, T, heads, head_dim]
    angles = rng.uniform(-50, 50, (2, 5, rotary // 2)).astype(np.float32)
    cos, sin = (np.concatenate([f(angles)] * 2, -1) * 1.2 for f in (np.cos, np.sin))
    ours = np.asarray(apply_rope(jnp.asarray(q), jnp.asarray(cos), jnp.asarray(sin)))
    ref, _ = phi3_apply_rotary_pos_emb(*(torch.tensor(x) for x in (q, q, cos, sin)), unsqueeze_dim=2)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ours[..., rotary:], q[..., rotary:])


def test_rope_config_parsing():
    base = {'max_position_embeddings': 64, 'rope_theta': 5e5}
    old = rope_from_config({**base, 'rope_scaling': {'type': 'linear', 'factor': 2.0}}, 'LlamaForCausalLM')
    new = rope_from_config({**base, 'rope_parameters': {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 5e5}},
                           'LlamaForCausalLM')
    assert old == new and (old.rope_type, old.factor, old.theta) == ('linear', 2.0, 5e5)
    # both present: transformers takes rope_scaling
    both = {**base, 'rope_scaling': {'type': 'dynamic', 'factor': 3.0},
            'rope_parameters': {'rope_type': 'linear', 'factor': 2.0}}
    assert LlamaConfig(**both).rope_parameters['rope_type'] == 'dynamic'
    assert rope_from_config(both, 'LlamaForCausalLM').rope_type == 'dynamic'
    yarn = rope_from_config({**base, 'rope_scaling': {'type': 'yarn', 'factor': 4.0}}, 'Qwen2ForCausalLM')
    assert yarn.original_max_position_embeddings == 64 and yarn.attention_factor > 1
    with pytest.raises(UnsupportedArchitectureError, match="rope type 'mrope'"):
        rope_from_config({'rope_scaling': {'type': 'mrope'}}, 'LlamaForCausalLM')
    with pytest.raises(ValueError, match="'factor'"):
        rope_from_config({'rope_scaling': {'type': 'linear'}}, 'LlamaForCausalLM')
    with pytest.raises(ValueError, match="'long_factor'"):
        rope_from_config({'rope_scaling': {'type': 'longrope', 'short_factor': [1.0]}}, 'Phi3ForCausalLM')


def test_partial_factor_follows_the_architecture():
    partial = {'partial_rotary_factor': 0.5, 'rope_theta': 1e4}
    # Llama's transformers model rotates whole heads in the default type, whatever the factor says
    assert rope_from_config(partial, 'LlamaForCausalLM').partial_rotary_factor == 1.0
    assert rope_from_config(partial, 'Phi3ForCausalLM', partial_rotary=True).partial_rotary_factor == 0.5
    with pytest.raises(UnsupportedArchitectureError, match='partial_rotary_factor 0.5'):
        rope_from_config({**partial, 'rope_scaling': {'type': 'linear', 'factor': 2.0}}, 'LlamaForCausalLM')


def test_rope_scaling_factor_is_lmdeploys_dynamic_ntk():
    assert TurbomindEngineConfig().rope_scaling_factor == 0.0
    for bad in (-1.0, float('nan'), 'x'):
        with pytest.raises(ValueError, match='rope_scaling_factor'):
            TurbomindEngineConfig(rope_scaling_factor=bad)
    rope = rope_from_config({'rope_scaling': {'type': 'yarn', 'factor': 4.0, 'partial_rotary_factor': 0.5},
                             'rope_theta': 321.0}, 'Phi3ForCausalLM', partial_rotary=True)
    assert dynamic_ntk(rope, 2.5, 128) == dataclasses.replace(
        rope_from_config({'rope_scaling': {'type': 'dynamic', 'factor': 2.5, 'partial_rotary_factor': 0.5},
                          'rope_theta': 321.0, 'max_position_embeddings': 128}, 'Phi3ForCausalLM',
                         partial_rotary=True))


@pytest.mark.parametrize('tp', [1, 2])
def test_partial_rotation_at_decode_keeps_the_fused_layout(rng, tp):
    """The decode path rotates q and k inside the fused qkv (tensor-parallel shards' pieces in
    turn) and hands the op identity tables; the same as rotating q and k apart."""
    heads, kv_heads, head_dim, rows = 4, 2, 16, 3
    spec = ModelSpec('Phi3ForCausalLM', 1, heads, kv_heads, head_dim, 64, 128, 64, jnp.float32, (), 96, 1e-5, False,
                     RopeSpec(partial_rotary_factor=0.5))
    layout = FusedLayout(spec, tp)
    q, k, v = (rng.standard_normal((rows, n * head_dim)).astype(np.float32) for n in (heads, kv_heads, kv_heads))
    qkv = join_fused([jnp.asarray(x) for x in (q, k, v)], layout, 'qkv')
    assert [np.asarray(x).tolist() for x in split_fused(qkv, layout, 'qkv')] == [x.tolist() for x in (q, k, v)]
    angles = rng.uniform(-20, 20, (rows, 4)).astype(np.float32)
    cos, sin = (jnp.asarray(np.concatenate([f(angles)] * 2, -1)) for f in (np.cos, np.sin))
    rotated, one, zero = _rope_before_the_op(spec, layout, qkv, cos, sin, hadamard=False)
    assert np.all(np.asarray(one) == 1) and np.all(np.asarray(zero) == 0) and one.shape == (rows, head_dim)
    expected = [apply_rope(jnp.asarray(x).reshape(rows, -1, head_dim), cos, sin).reshape(rows, -1) for x in (q, k)]
    for ours, ref in zip(split_fused(rotated, layout, 'qkv'), expected + [v]):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


# ---- the decoder: a Phi-3 with longrope and partial rotary dims ----

def test_longrope_partial_decoder_matches_phi3(rng, tmp_path):
    """One-chunk prefill and token-by-token decode of a Phi-3 (longrope, 3/4 of each head rotated)
    against the Phi-3 model, with transformers' calls: the prompt in one call, each token in its own."""
    head_dim, original = 16, 12
    rope = {'rope_type': 'longrope', 'partial_rotary_factor': 0.75, 'rope_theta': float(rng.uniform(1e3, 1e5)),
            'short_factor': rng.uniform(1, 2, 6).tolist(), 'long_factor': rng.uniform(1, 16, 6).tolist(),
            'original_max_position_embeddings': original}
    config = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=48,
                        original_max_position_embeddings=original, rope_parameters=rope, initializer_range=0.2,
                        pad_token_id=0)
    torch.manual_seed(int(rng.integers(1 << 30)))
    phi3 = Phi3ForCausalLM(config).float().eval()
    phi3.save_pretrained(tmp_path)
    model = load_model(ModelSource(str(tmp_path), str(tmp_path)))
    assert model.spec.rope.rope_type == 'longrope' and rotary_dim(model.spec.rope, head_dim) == 12
    # the first call of one is below the threshold, of the other above; decoding crosses it
    prompts = [rng.integers(0, 128, n).tolist() for n in (original + 2, original + 9)]
    decoded = 6
    with torch.no_grad():
        refs = []
        for p in prompts:
            cache = {CACHE_KWARG: DynamicCache(config=config)}      # filled in place by each call
            logits = [phi3(torch.tensor([p[:-decoded]]), use_cache=True, **cache).logits[0]]
            for token in p[-decoded:]:
                logits.append(phi3(torch.tensor([[token]]), use_cache=True, **cache).logits[0])
            refs.append(torch.cat(logits).numpy())
    run = PagedRun(model, prompts, seed=int(rng.integers(100)))
    firsts = [len(p) - decoded for p in prompts]
    got = run.step(firsts, max(firsts))
    for _ in range(decoded):
        got = [np.concatenate([g, row]) for g, row in zip(got, run.step([1, 1], 1))]
    for ours, expected in zip(got, refs):
        _assert_logits_close(ours, expected)


# ---- end to end: the JAX engine's greedy tokens against the reference backend's ----

MAX_POSITIONS, ORIGINAL, SESSION, NEW_TOKENS = 32, 24, 72, 16
# The engine runs one path per kind of type, so one type of each runs end to end (the frequencies of
# every type are checked against transformers above): yarn for the types whose frequencies are fixed
# (linear and llama3 too; yarn's attention factor scales the tables besides), dynamic and longrope
# for the two whose frequencies follow each row's length.
E2E_ROPES = {
    'dynamic': {'factor': 3.0},
    'yarn': {'factor': 4.0, 'original_max_position_embeddings': ORIGINAL, 'beta_fast': 8.0},
    'longrope': {'original_max_position_embeddings': ORIGINAL},
}


@pytest.fixture(scope='module')
def default_llama(tmp_path_factory):
    """A tiny random Llama (default rope) saved to a directory, its prompts (generations that cross
    ORIGINAL and MAX_POSITIONS, a prompt longer than both), a generator, and the reference's greedy
    tokens for the prompts with the default rope."""
    seed = int(np.random.default_rng().integers(1 << 30))
    print(f'e2e seed {seed}')
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.25,
                         max_position_embeddings=MAX_POSITIONS, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    path = tmp_path_factory.mktemp('default_rope')
    LlamaForCausalLM(config).float().eval().save_pretrained(path)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 256, n).tolist() for n in (ORIGINAL - 10, MAX_POSITIONS - 10, MAX_POSITIONS + 9)]
    return path, prompts, rng, reference_tokens(ModelSource(str(path), 'default'), prompts)


def with_rope(path, tmp_path, params: dict) -> ModelSource:
    """A copy of the checkpoint at ``path`` whose config's rope_scaling is ``params``."""
    target = tmp_path / params['rope_type']
    shutil.copytree(path, target)
    config = json.loads((target / 'config.json').read_text())
    config.pop('rope_parameters', None)
    config['rope_scaling'] = params
    (target / 'config.json').write_text(json.dumps(config))
    return ModelSource(str(target), params['rope_type'])


def e2e_rope(rope_type: str, rng) -> dict:
    params = {'rope_type': rope_type, **E2E_ROPES[rope_type]}
    if rope_type == 'longrope':
        params.update(short_factor=rng.uniform(1, 1.5, 8).tolist(), long_factor=rng.uniform(2, 12, 8).tolist())
    return params


def reference_tokens(source: ModelSource, prompts) -> list[list[int]]:
    """The reference backend's greedy tokens, one request after another, shortest first: a
    transformers rotary embedding that grew for one request then serves the next as a fresh one."""
    engine = PytorchEngine(source, PytorchEngineConfig(device_type='cpu', session_len=SESSION))
    try:
        return [run_all(engine, [EngineRequest(i, p, GenerationConfig(max_new_tokens=NEW_TOKENS))])[0].tokens
                for i, p in enumerate(sorted(prompts, key=len))]
    finally:
        engine.close()


def jax_tokens(source: ModelSource, prompts, **config) -> list[list[int]]:
    """The JAX engine's greedy tokens, all prompts at once, each prefilled in one chunk."""
    engine = JaxEngine(source, TurbomindEngineConfig(dtype='float32', session_len=SESSION, max_batch_size=4,
                                                     cache_block_seq_len=16, num_cache_blocks=24, **config),
                       decode_batch=[4], prefill_tokens=[64], prefill_batch=[4])
    try:
        results = run_all(engine, [EngineRequest(i, p, GenerationConfig(max_new_tokens=NEW_TOKENS))
                                   for i, p in enumerate(sorted(prompts, key=len))])
        return [r.tokens for r in results]
    finally:
        engine.close()


@pytest.mark.parametrize('rope_type', (*E2E_ROPES, 'rope_scaling_factor'))
def test_engine_greedy_tokens_match_the_reference(default_llama, tmp_path, rope_type):
    path, prompts, rng, unscaled = default_llama
    if rope_type == 'rope_scaling_factor':
        # LMDeploy's engine option on a default-rope checkpoint is its config's dynamic rope
        ours = jax_tokens(ModelSource(str(path), 'default'), prompts, rope_scaling_factor=3.0)
        rope_type = 'dynamic'
    else:
        ours = None
    source = with_rope(path, tmp_path, e2e_rope(rope_type, rng))
    expected = reference_tokens(source, prompts)
    ours = ours or jax_tokens(source, prompts)
    assert ours == expected
    assert all(len(t) == NEW_TOKENS for t in expected)
    # the scaling changes the tokens (for dynamic and longrope past their thresholds only)
    assert expected != unscaled


def test_a_rope_type_without_a_jax_model_falls_back_with_one_warning(default_llama, tmp_path, caplog):
    """transformers' Llama runs 'proportional' rope; the JAX engine has none: the pytorch backend
    serves it, after one warning naming the rope type. The engine option that changes the rope is
    refused there rather than dropped."""
    try:
        tokenizer_dir = resolve_model(None).hf_dir
    except FileNotFoundError as e:
        pytest.skip(str(e))
    path, prompts, _, _ = default_llama
    source = with_rope(path, tmp_path, {'rope_type': 'proportional', 'rope_theta': 1e4, 'partial_rotary_factor': 0.5})
    shutil.copy(f'{tokenizer_dir}/tokenizer.json', source.hf_dir)
    check_supported(source)
    with caplog.at_level(logging.WARNING, logger='lmdeploy_jax'):
        engine = create_backend(source, 'turbomind', TurbomindEngineConfig(session_len=SESSION))
    try:
        assert isinstance(engine, PytorchEngine)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert [w for w in warnings if 'falling back' in w] == [
            "architecture 'LlamaForCausalLM' with rope type 'proportional' is not supported by the JAX engine "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); falling back to the pytorch reference backend"]
        hf = LlamaForCausalLM.from_pretrained(source.hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        result = run_all(engine, [EngineRequest(0, prompts[0], GenerationConfig(max_new_tokens=4))])[0]
        assert result.tokens == expected[0, len(prompts[0]):].tolist()
    finally:
        engine.close()
    with pytest.raises(ValueError, match='rope_scaling_factor=2.0 cannot be applied by the pytorch backend'):
        create_backend(source, 'turbomind', TurbomindEngineConfig(rope_scaling_factor=2.0))
