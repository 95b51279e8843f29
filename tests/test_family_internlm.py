"""InternLM2 / 2.5 and InternLM3 on the JAX engine. Both ship remote code that cannot be fetched
here, so each checkpoint is a tiny random transformers Llama written in the family's published
layout, with a config.json of the family's architecture and keys:

- InternLM2: ``tok_embeddings``, ``attention.wqkv`` packed ``[kv_heads, q_per_kv + 2, head_dim]``
  per KV group (its q heads, its k, its v), ``attention.wo``, ``feed_forward.w1/w3/w2``,
  ``attention_norm``, ``ffn_norm``, ``output``; ``bias: true`` (wqkv and wo biases), a linear
  ``rope_scaling`` in the legacy ``type`` spelling. The PyTorch reference runs the Llama it came
  from (transformers cannot load InternLM2 without its remote code).
- InternLM3: Llama's names with ``qkv_bias``/``bias`` and ``model_type: internlm3``, which
  transformers 5 runs as a Llama, so the reference backend loads this very checkpoint.

At tp=1 and tp=2 (``family_harness.py``): greedy tokens for 32 new tokens on 4 prompts (and a fifth
from the prefix cache) equal the reference's, last-position logits within 1e-4 of the Llama's.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from family_harness import family_checks
from safetensors.numpy import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from lmdeploy_jax.backends import check_supported
from lmdeploy_jax.checkpoint.source import ModelSource
from lmdeploy_jax.models.families.internlm2 import grouped_qkv_rows

LINEAR_ROPE = {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 5000.0}
SHARED_KEYS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
               'num_key_value_heads', 'max_position_embeddings', 'rms_norm_eps', 'hidden_act', 'tie_word_embeddings')


def _llama(fields: dict, path: str) -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig(**fields)).float().eval()
    model.save_pretrained(path)
    return model


def _group_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_heads: int) -> np.ndarray:
    """q/k/v rows (``[heads * d, ...]``, ``[kv_heads * d, ...]``) packed as InternLM2's wqkv."""
    d = k.shape[0] // kv_heads
    def heads(x):        # [kv_heads, heads per group, d, ...]
        return x.reshape(kv_heads, -1, d, *x.shape[1:])
    grouped = np.concatenate([heads(q), heads(k), heads(v)], axis=1)
    return grouped.reshape(-1, *q.shape[1:])


def make_internlm2(fields: dict, path: str, rng) -> LlamaForCausalLM:
    """A Llama (q/k/v/o biases, linear rope) saved at ``path + '-llama'`` and in InternLM2's layout at ``path``."""
    llama = _llama({**fields, 'attention_bias': True, 'rope_parameters': LINEAR_ROPE}, path + '-llama')
    sd = {k: v.numpy() for k, v in llama.state_dict().items()}
    kv_heads = fields['num_key_value_heads']
    tensors = {'model.tok_embeddings.weight': sd['model.embed_tokens.weight'],
               'model.norm.weight': sd['model.norm.weight'], 'output.weight': sd['lm_head.weight']}
    for i in range(fields['num_hidden_layers']):
        layer = f'model.layers.{i}.'
        for suffix in ('weight', 'bias'):
            tensors[f'{layer}attention.wqkv.{suffix}'] = _group_qkv(
                *(sd[f'{layer}self_attn.{p}_proj.{suffix}'] for p in 'qkv'), kv_heads)
            tensors[f'{layer}attention.wo.{suffix}'] = sd[f'{layer}self_attn.o_proj.{suffix}']
        for theirs, mine in (('gate_proj', 'w1'), ('up_proj', 'w3'), ('down_proj', 'w2')):
            tensors[f'{layer}feed_forward.{mine}.weight'] = sd[f'{layer}mlp.{theirs}.weight']
        tensors[f'{layer}attention_norm.weight'] = sd[f'{layer}input_layernorm.weight']
        tensors[f'{layer}ffn_norm.weight'] = sd[f'{layer}post_attention_layernorm.weight']
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(path, 'model.safetensors'))
    config = {k: llama.config.to_dict()[k] for k in SHARED_KEYS}
    config.update(architectures=['InternLM2ForCausalLM'], model_type='internlm2', bias=True, torch_dtype='float32',
                  rope_theta=LINEAR_ROPE['rope_theta'], rope_scaling={'type': 'linear', 'factor': 2.0},
                  auto_map={'AutoConfig': 'configuration_internlm2.InternLM2Config',
                            'AutoModelForCausalLM': 'modeling_internlm2.InternLM2ForCausalLM'})
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(config, f)
    return llama


def make_internlm3(fields: dict, path: str, rng) -> LlamaForCausalLM:
    """A Llama with q/k/v/o and MLP biases, its config.json rewritten as InternLM3's."""
    llama = _llama({**fields, 'attention_bias': True, 'mlp_bias': True}, path)
    with open(os.path.join(path, 'config.json')) as f:
        config = json.load(f)
    for key in ('attention_bias', 'mlp_bias'):
        config.pop(key)
    config.update(architectures=['InternLM3ForCausalLM'], model_type='internlm3', qkv_bias=True, bias=True)
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(config, f)
    return llama


FAMILIES = {'internlm2': (make_internlm2, dict(vocab_size=300)),
            'internlm3': (make_internlm3, dict(vocab_size=300))}


(families, jax_results, test_greedy_tokens_equal_the_reference,
 test_last_position_logits_match_transformers) = family_checks(
    FAMILIES, reference_path=lambda name, path: path + '-llama' if name == 'internlm2' else path)


def test_grouped_qkv_rows_invert_the_packing(rng):
    """The rows ``grouped_qkv_rows`` names pick q, k and v back out of a grouped wqkv (the test
    checkpoint's packing, written independently), and together cover each row once."""
    for heads, kv_heads, d in ((4, 2, 3), (6, 1, 2), (4, 4, 5)):
        q, k, v = (rng.standard_normal((n * d, 3)) for n in (heads, kv_heads, kv_heads))
        packed = _group_qkv(q, k, v, kv_heads)
        rows = grouped_qkv_rows(heads, kv_heads, d)
        for part, expected in zip(rows, (q, k, v)):
            np.testing.assert_array_equal(packed[part], expected)
        assert sorted(np.concatenate(rows).tolist()) == list(range(packed.shape[0]))


def test_internlm2_the_engine_cannot_run_is_refused_by_name(families, tmp_path):
    """An InternLM2 checkpoint whose config the JAX engine cannot run (a rope type it lacks) has no
    fallback (transformers cannot load InternLM2 without its remote code): refused before loading,
    naming the architecture."""
    path = families['internlm2']['path']
    for name in os.listdir(path):
        os.symlink(os.path.join(path, name), tmp_path / name)
    with open(os.path.join(path, 'config.json')) as f:
        config = json.load(f)
    config['rope_scaling'] = {'type': 'ntk-by-parts', 'factor': 2.0}
    os.unlink(tmp_path / 'config.json')
    (tmp_path / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'InternLM2ForCausalLM' is not supported: neither the JAX engine nor "
                                         "transformers"):
        check_supported(ModelSource(str(tmp_path), str(tmp_path)))


def test_the_pytorch_backend_refuses_internlm2_naming_its_remote_code(families):
    """transformers has no InternLM2 of its own: the reference backend names the remote code it does
    not run, rather than prompting to run it."""
    from lmdeploy_jax.messages import PytorchEngineConfig
    from lmdeploy_jax.pytorch.engine import PytorchEngine
    path = families['internlm2']['path']
    with pytest.raises(ValueError, match=r"^architecture 'InternLM2ForCausalLM' ships its own modeling code"):
        PytorchEngine(ModelSource(path, path), PytorchEngineConfig(device_type='cpu'))
