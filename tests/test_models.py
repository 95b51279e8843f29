"""The JAX Llama-family models against Hugging Face ``transformers`` on the same weights: logits of
a whole prompt in one chunk, in two chunks, and token by token through the paged cache."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from paged_run import PagedRun
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
    Qwen2ForCausalLM

from lmdeploy_jax.checkpoint.source import ModelSource, resolve_model
from lmdeploy_jax.models import (SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, is_supported,
                                 kv_bytes_per_block, load_model)
from lmdeploy_jax.models.spec import rope_from_config

TINY = dict(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
            initializer_range=0.1, max_position_embeddings=256)
LLAMA3_ROPE = {'rope_type': 'llama3', 'rope_theta': 10000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
               'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}
CHECKPOINTS = {
    # untied, llama3 rope scaling, GQA 2
    'llama': (LlamaConfig, LlamaForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                   rope_parameters=LLAMA3_ROPE)),
    # GQA 4 (one KV head)
    'mistral': (MistralConfig, MistralForCausalLM,
                dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24, sliding_window=None)),
    # q/k/v biases, tied embeddings, GQA 3
    'qwen2': (Qwen2Config, Qwen2ForCausalLM,
              dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)),
}
SEQ_LENS = (13, 6)


def _assert_logits_close(ours, ref):
    ref = np.asarray(ref, np.float32)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.fixture(scope='module', params=sorted(CHECKPOINTS))
def tiny(request, tmp_path_factory):
    """(model dir, random prompts, the HF logits of each prompt)."""
    config_cls, model_cls, extra = CHECKPOINTS[request.param]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**TINY, **extra)).float().eval()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, TINY['vocab_size'], n).tolist() for n in SEQ_LENS]
    with torch.no_grad():
        ref = [hf(torch.tensor([p])).logits[0].numpy() for p in prompts]
    return str(path), prompts, ref


def test_one_chunk_prefill_matches_transformers(tiny):
    path, prompts, ref = tiny
    run = PagedRun(load_model(ModelSource(path, path)), prompts)
    for ours, expected in zip(run.step(SEQ_LENS, max(SEQ_LENS)), ref):
        _assert_logits_close(ours, expected)


def test_two_chunk_prefill_matches_transformers(tiny):
    path, prompts, ref = tiny
    run = PagedRun(load_model(ModelSource(path, path)), prompts, block_size=8, seed=3)
    first = [5, 4]
    a = run.step(first, 5)
    b = run.step([n - f for n, f in zip(SEQ_LENS, first)], 8)
    for x, y, expected in zip(a, b, ref):
        _assert_logits_close(np.concatenate([x, y]), expected)


def test_token_by_token_decode_matches_transformers(tiny):
    path, prompts, ref = tiny
    run = PagedRun(load_model(ModelSource(path, path)), prompts, seed=5)
    got = [[] for _ in prompts]
    for t in range(max(SEQ_LENS)):
        for i, row in enumerate(run.step([int(t < n) for n in SEQ_LENS], 1)):
            got[i].extend(row)
    for ours, expected in zip(got, ref):
        _assert_logits_close(np.stack(ours), expected)


def test_spec_and_params_follow_the_config(tiny):
    path, _, _ = tiny
    model = load_model(ModelSource(path, path), dtype='bfloat16')
    config = json.load(open(f'{path}/config.json'))
    spec = model.spec
    assert spec.architecture == config['architectures'][0] and is_supported(spec.architecture)
    assert (spec.num_layers, spec.hidden_size, spec.vocab_size) == (2, 96, 256)
    module = model.module()
    assert isinstance(module, nnx.Module)
    layers = module.layers
    qkv_rows = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    assert layers.attn.qkv.w.shape == (spec.num_layers, qkv_rows, spec.hidden_size)
    assert layers.mlp.gate_up.w.shape == (spec.num_layers, 2 * spec.intermediate_size, spec.hidden_size)
    assert spec.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model.params))
    assert hasattr(module, 'lm_head') == (not config['tie_word_embeddings'])
    assert (layers.attn.qkv.b is not None) == (spec.architecture == 'Qwen2ForCausalLM')
    k, v = model.init_kv_caches(spec, 5, 8)
    assert k.shape == v.shape == (spec.num_layers, spec.num_kv_heads, 5, 8, spec.head_dim)
    assert k.dtype == jnp.bfloat16
    assert kv_bytes_per_block(spec, 8) == (k.nbytes + v.nbytes) // 5


def test_bfloat16_prefill_stays_near_the_float32_reference(tiny):
    path, prompts, ref = tiny
    run = PagedRun(load_model(ModelSource(path, path), dtype='bfloat16'), prompts)
    for ours, expected in zip(run.step(SEQ_LENS, max(SEQ_LENS)), ref):
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, expected, atol=0.05 * np.abs(expected).max())


def test_rope_config_old_and_new_styles_agree():
    llama3 = {k: v for k, v in LLAMA3_ROPE.items() if k not in ('rope_theta', 'rope_type')}
    old = {'rope_theta': 5e5, 'rope_scaling': {**llama3, 'type': 'llama3'}}
    new = {'rope_parameters': {**llama3, 'rope_type': 'llama3', 'rope_theta': 5e5}}
    assert rope_from_config(old, 'LlamaForCausalLM') == rope_from_config(new, 'LlamaForCausalLM')
    assert rope_from_config(new, 'LlamaForCausalLM').factor == 8.0
    assert rope_from_config({'rope_theta': 5e5}, 'LlamaForCausalLM').theta == 5e5
    with pytest.raises(UnsupportedArchitectureError, match="rope type 'mrope'"):
        rope_from_config({'rope_scaling': {'type': 'mrope'}}, 'Qwen2ForCausalLM')


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / 'config.json').write_text(json.dumps({'architectures': ['GPT2LMHeadModel']}))
    assert not is_supported('GPT2LMHeadModel') and 'LlamaForCausalLM' in SUPPORTED_ARCHITECTURES
    with pytest.raises(UnsupportedArchitectureError, match='GPT2LMHeadModel'):
        load_model(ModelSource(str(tmp_path), str(tmp_path)))


def test_default_model_matches_transformers():
    """The real SmolLM2: one-chunk prefill, then (fresh cache) two chunks and three decode steps."""
    try:
        source = resolve_model(None)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(source.hf_dir)('What is the capital of France?')['input_ids']
    hf = LlamaForCausalLM.from_pretrained(source.hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    del hf
    model, n = load_model(source), len(ids)
    _assert_logits_close(PagedRun(model, [ids]).step([n], n)[0], ref)
    run = PagedRun(model, [ids], seed=7)
    got = run.step([3], n) + run.step([n - 6], n) + [run.step([1], 1)[0] for _ in range(3)]
    _assert_logits_close(np.concatenate(got), ref)
