"""``lmdeploy_jax.load_model``: a checkpoint as an ``nnx`` module, called on token ids without the
engine, and ``jax.grad`` through it, against transformers' logits and torch's autograd on the same
random float32 weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

import lmdeploy_jax
from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.models.layers.decoder import CausalLM

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, initializer_range=0.2, max_position_embeddings=64,
              tie_word_embeddings=False)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A tiny random Llama (transformers' class, float32) with the default model's tokenizer files."""
    import shutil
    torch.manual_seed(int(np.random.SeedSequence().entropy % (1 << 30)))
    hf = LlamaForCausalLM(LlamaConfig(**CONFIG)).float().eval()
    path = tmp_path_factory.mktemp('llama')
    hf.save_pretrained(path)
    default = resolve_model(None).hf_dir
    for name in ('tokenizer.json', 'tokenizer_config.json'):
        shutil.copy(f'{default}/{name}', path)
    return str(path), hf


def _nll(logits, ids):
    """Mean next-token negative log-likelihood of ``ids [B, T]`` under ``logits [B, T, V]``."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


def test_logits_and_gradients_match_transformers(checkpoint, rng):
    path, hf = checkpoint
    model, tokenizer = lmdeploy_jax.load_model(path)
    assert isinstance(model, CausalLM) and isinstance(model, nnx.Module)
    assert tokenizer.encode('w1 w2') != []
    ids = rng.integers(0, CONFIG['vocab_size'], (3, 11))
    logits = model.token_logits(jnp.asarray(ids))
    ref_ids = torch.tensor(ids)
    ref_logits = hf(ref_ids).logits
    np.testing.assert_allclose(np.asarray(logits), ref_logits.detach().numpy(), rtol=1e-4, atol=1e-4)

    graph, state = nnx.split(model)
    grads = jax.grad(lambda s: _nll(nnx.merge(graph, s).token_logits(jnp.asarray(ids)), jnp.asarray(ids)))(state)
    ref_loss = torch.nn.functional.cross_entropy(ref_logits[:, :-1].reshape(-1, CONFIG['vocab_size']),
                                                 ref_ids[:, 1:].reshape(-1))
    ref_loss.backward()
    ref = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    pairs = [(grads['norm']['weight'], ref['model.norm.weight']),
             (grads['embed'], ref['model.embed_tokens.weight']),
             (grads['layers']['attn']['o']['w'][1], ref['model.layers.1.self_attn.o_proj.weight']),
             (grads['layers']['mlp']['gate_up']['w'][0][:CONFIG['intermediate_size']],
              ref['model.layers.0.mlp.gate_proj.weight']),
             (grads['layers']['attn']['qkv']['w'][0][:CONFIG['num_attention_heads'] * CONFIG['head_dim']],
              ref['model.layers.0.self_attn.q_proj.weight'])]
    for ours, expected in pairs:
        ours = np.asarray(ours[...] if hasattr(ours, 'value') else ours)
        np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_token_ids_must_be_a_matrix_of_integers(checkpoint):
    model, _ = lmdeploy_jax.load_model(checkpoint[0])
    for bad in (jnp.zeros((4,), jnp.int32), jnp.ones((1, 3), jnp.float32)):
        with pytest.raises(ValueError, match=r'token_ids must be an integer array \[batch, tokens\]'):
            model.token_logits(bad)
