"""``lmdeploy_jax.load_model``: a checkpoint as an ``nnx`` module, called on token ids without the
engine, ``jax.grad`` through it, the logit lens and the input embeddings' gradients, against
transformers' logits and hidden states and torch's autograd on the same random float32 weights
(with a separate output head and with one tied to the embeddings)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

import lmdeploy_jax
from lmdeploy_jax import GenerationConfig, TurbomindEngineConfig
from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.engine.engine import JaxEngine
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.models.layers.decoder import CausalLM
from lmdeploy_jax.research import input_embedding_grad, logit_lens
from test_engine_helpers import run_all

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, initializer_range=0.2, max_position_embeddings=64,
              tie_word_embeddings=False)


def _tiny_llama(tmp_path_factory, tied: bool):
    """A tiny random Llama (transformers' class, float32) with the default model's tokenizer files:
    ``(directory, model)``."""
    import shutil
    torch.manual_seed(int(np.random.SeedSequence().entropy % (1 << 30)))
    hf = LlamaForCausalLM(LlamaConfig(**{**CONFIG, 'tie_word_embeddings': tied})).float().eval()
    path = tmp_path_factory.mktemp('llama')
    hf.save_pretrained(path)
    default = resolve_model(None).hf_dir
    for name in ('tokenizer.json', 'tokenizer_config.json'):
        shutil.copy(f'{default}/{name}', path)
    return str(path), hf


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """``_tiny_llama`` with its own output head."""
    return _tiny_llama(tmp_path_factory, tied=False)


@pytest.fixture(scope='module')
def tied_checkpoint(tmp_path_factory):
    """``_tiny_llama`` with the output head tied to the embeddings (as the default model's is)."""
    return _tiny_llama(tmp_path_factory, tied=True)


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
    ids = jnp.asarray(ids)
    grads = jax.jit(jax.grad(lambda s: _nll(nnx.merge(graph, s).token_logits(ids), ids)))(state)
    ref_loss = torch.nn.functional.cross_entropy(ref_logits[:, :-1].reshape(-1, CONFIG['vocab_size']),
                                                 ref_ids[:, 1:].reshape(-1))
    ref_loss.backward()
    ref = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    pairs = [(grads['norm']['weight'], ref['model.norm.weight']),
             (grads['embed'], ref['model.embed_tokens.weight']),
             (grads['layers']['attn']['o']['w'][1], ref['model.layers.1.self_attn.o_proj.weight']),
             (grads['layers']['mlp']['down']['w'][1], ref['model.layers.1.mlp.down_proj.weight']),
             (grads['layers']['mlp']['gate_up']['w'][0][:CONFIG['intermediate_size']],
              ref['model.layers.0.mlp.gate_proj.weight']),
             (grads['layers']['attn']['qkv']['w'][0][:CONFIG['num_attention_heads'] * CONFIG['head_dim']],
              ref['model.layers.0.self_attn.q_proj.weight'])]
    for ours, expected in pairs:
        assert_close(np.asarray(ours.get_value() if hasattr(ours, 'get_value') else ours), expected)


def assert_close(ours: np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> None:
    """``ours`` equals ``expected`` within ``rel`` of its norm (both float32)."""
    assert ours.shape == expected.shape
    error = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
    assert error < rel, f'relative error {error:.2e}'


def test_logit_lens_equals_the_head_on_each_layers_hidden_state(checkpoint, rng):
    """Depth k: the final norm and the head on transformers' hidden state after k layers; the
    last depth: the logits."""
    path, hf = checkpoint
    model, _ = lmdeploy_jax.load_model(path)
    ids = rng.integers(0, CONFIG['vocab_size'], (2, 9))
    lens = np.asarray(logit_lens(model, jnp.asarray(ids)))
    with torch.no_grad():
        out = hf(torch.tensor(ids), output_hidden_states=True)
        expected = [hf.lm_head(hf.model.norm(h)) for h in out.hidden_states[:-1]] + [out.logits]
    assert lens.shape == (CONFIG['num_hidden_layers'] + 1, *ids.shape, CONFIG['vocab_size'])
    for depth, ref in enumerate(expected):
        assert_close(lens[depth], ref.numpy())
    assert not np.allclose(lens[0], lens[-1])


@pytest.mark.parametrize('tied', [False, True])
def test_input_embedding_grad_matches_torch_autograd(tied, checkpoint, tied_checkpoint, rng):
    """The gradient of the last position's log-probability of a chosen token with respect to each
    input position's embedding (a token repeated: one gradient per occurrence), as torch's
    autograd gives it with ``inputs_embeds``; a tied head's use of the table is not counted."""
    path, hf = tied_checkpoint if tied else checkpoint
    model, _ = lmdeploy_jax.load_model(path)
    ids = rng.integers(0, CONFIG['vocab_size'], (2, 10))
    ids[:, 7] = ids[:, 2]
    target = int(rng.integers(CONFIG['vocab_size']))
    value, grad = input_embedding_grad(model, jnp.asarray(ids),
                                       lambda logits: jax.nn.log_softmax(logits[:, -1])[:, target].sum())
    embeds = hf.model.embed_tokens(torch.tensor(ids)).detach().requires_grad_()
    ref = torch.log_softmax(hf(inputs_embeds=embeds).logits[:, -1], -1)[:, target].sum()
    ref.backward()
    np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)
    assert grad.shape == (*ids.shape, CONFIG['hidden_size']) and grad.dtype == jnp.float32
    assert_close(np.asarray(grad), embeds.grad.numpy())


def test_token_ids_must_be_a_matrix_of_integers(checkpoint):
    model, _ = lmdeploy_jax.load_model(checkpoint[0])
    for bad in (jnp.zeros((4,), jnp.int32), jnp.ones((1, 3), jnp.float32)):
        for call in (model.token_logits, lambda ids: logit_lens(model, ids),
                     lambda ids: input_embedding_grad(model, ids, jnp.sum)):
            with pytest.raises(ValueError, match=r'token_ids must be an integer array \[batch, tokens\]'):
                call(bad)


SMALL_ENGINE = dict(dtype='float32', session_len=64, max_batch_size=4, num_cache_blocks=24, cache_block_seq_len=16,
                    max_prefill_token_num=128, enable_prefix_caching=True)
SMALL_BUCKETS = dict(decode_batch=[4], prefill_tokens=[32], prefill_batch=[4])


def _greedy(engine, prompts: list[list[int]], new_tokens: int = 6) -> list[list[int]]:
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return [r.tokens for r in run_all(engine, [EngineRequest(i, p, gen) for i, p in enumerate(prompts)])]


def _fresh_greedy(path: str, prompts: list[list[int]]) -> list[list[int]]:
    engine = JaxEngine(resolve_model(path), TurbomindEngineConfig(**SMALL_ENGINE), **SMALL_BUCKETS)
    try:
        return _greedy(engine, prompts)
    finally:
        engine.close()


def test_update_weights_serves_the_new_weights_without_a_restart(checkpoint, tmp_path_factory, rng):
    """After the swap the same prompts (whose first block the prefix cache holds, computed with the
    old weights) get the tokens of a fresh engine on the new weights."""
    path, _ = checkpoint
    other, _ = _tiny_llama(tmp_path_factory, tied=False)
    new_params = nnx.state(lmdeploy_jax.load_model(other)[0])
    prompts = [rng.integers(0, CONFIG['vocab_size'], 20).tolist() for _ in range(3)]
    engine = JaxEngine(resolve_model(path), TurbomindEngineConfig(**SMALL_ENGINE), **SMALL_BUCKETS)
    try:
        before = _greedy(engine, prompts)
        engine.update_weights(new_params)
        after = _greedy(engine, prompts)
        assert engine.stats()['prefix_hit_blocks'] == 0
    finally:
        engine.close()
    assert after == _fresh_greedy(other, prompts) and after != before


def test_pipeline_update_weights_checks_what_it_is_given(checkpoint, tmp_path_factory, rng):
    """Through the pipeline: perplexities are the new weights' (as the module computes them), and
    params of another shape, dtype or tree are refused naming the parameter."""
    path, _ = checkpoint
    other, _ = _tiny_llama(tmp_path_factory, tied=False)
    model, _ = lmdeploy_jax.load_model(other)
    ids = rng.integers(0, CONFIG['vocab_size'], (1, 12))
    expected = float(_nll(model.token_logits(jnp.asarray(ids)), jnp.asarray(ids)))
    params = nnx.to_pure_dict(nnx.state(model))
    with lmdeploy_jax.pipeline(path, backend_config=TurbomindEngineConfig(**SMALL_ENGINE)) as pipe:
        assert abs(pipe.get_ppl(ids.tolist())[0] - expected) > 1e-3
        pipe.update_weights(params)
        np.testing.assert_allclose(pipe.get_ppl(ids.tolist())[0], expected, rtol=1e-4)
        bad = {**params, 'norm': {'weight': params['norm']['weight'][:-1]}}
        with pytest.raises(ValueError, match=r'params/norm/weight: float32 \(63,\), the served parameter is float32'):
            pipe.update_weights(bad)
        bad = {**params, 'norm': {'weight': params['norm']['weight'].astype(jnp.bfloat16)}}
        with pytest.raises(ValueError, match=r'params/norm/weight: bfloat16'):
            pipe.update_weights(bad)
        with pytest.raises(ValueError, match=r"missing \['norm/weight'\], unknown \[\]"):
            pipe.update_weights({k: v for k, v in params.items() if k != 'norm'})
    with lmdeploy_jax.pipeline(path, backend='pytorch') as pipe:
        with pytest.raises(NotImplementedError, match="update_weights needs the turbomind backend, not 'pytorch'"):
            pipe.update_weights(params)
