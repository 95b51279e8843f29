"""4-bit AWQ and GPTQ checkpoints on the JAX engine. A tiny random Llama made by transformers'
class has its projections quantized (round to nearest, ``checkpoint.awq_packing``) and written in
AutoAWQ's GEMM layout (and GPTQ's); the same model with the dequantized weights is written as a
plain float32 checkpoint, the PyTorch reference backend's. The engine's greedy tokens on the 4-bit
checkpoint (32 new tokens, 4 prompts and a prefix-cached fifth) equal the reference's, and its
last-position logits transformers' (``family_harness.py``): AWQ asymmetric at tp=1 and tp=2, GPTQ
symmetric at tp=1 (the packed layouts split over tp alike once loaded), group 64."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from family_harness import family_checks
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from convert.to_engine import convert
from lmdeploy_jax.checkpoint import awq_packing
from lmdeploy_jax.checkpoint.source import ModelSource
from lmdeploy_jax.models import load_model
from lmdeploy_jax.models.loader import flat_state

LINEARS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
# o's and down's 256 inputs split over tp=2 at whole 128-row packed tiles
SHAPE = dict(vocab_size=300, hidden_size=256, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
             head_dim=32, num_hidden_layers=2)
# the same group size, so the second family's engine steps come from the first's compilation cache
CONFIGS = {'awq': {'quant_method': 'awq', 'bits': 4, 'group_size': 64, 'zero_point': True, 'version': 'gemm'},
           'gptq': {'quant_method': 'gptq', 'bits': 4, 'group_size': 64, 'desc_act': False, 'sym': True}}


def dense_path(path: str) -> str:
    return path + '-dequantized'


def write_quantized(model: LlamaForCausalLM, path: str, method: str) -> None:
    """Quantize ``model``'s projections in place (their weights become the dequantized ones), save
    it as a float checkpoint at ``dense_path(path)`` and as a ``method`` checkpoint at ``path``."""
    group = CONFIGS[method]['group_size']
    packed = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            module, _, leaf = name.rpartition('.')
            if leaf != 'weight' or module.rpartition('.')[2] not in LINEARS:
                continue
            codes, zeros, scales = awq_packing.quantize(param.numpy().T, group, symmetric=method == 'gptq')
            param.copy_(torch.from_numpy(awq_packing.dequantize(codes, zeros, scales).T))
            if method == 'awq':
                names, arrays = ('qweight', 'qzeros', 'scales'), awq_packing.pack_awq(codes, zeros, scales)
            else:
                names, arrays = ('qweight', 'qzeros', 'scales', 'g_idx'), awq_packing.pack_gptq(codes, zeros, scales)
            packed.update({f'{module}.{n}': torch.from_numpy(np.ascontiguousarray(a)) for n, a in zip(names, arrays)})
            packed[name] = None
    model.save_pretrained(dense_path(path))
    model.save_pretrained(path)
    weights = os.path.join(path, 'model.safetensors')
    tensors = {k: v for k, v in {**load_file(weights), **packed}.items() if v is not None}
    save_file(tensors, weights, metadata={'format': 'pt'})
    config_path = os.path.join(path, 'config.json')
    config = json.load(open(config_path))
    config['quantization_config'] = CONFIGS[method]
    json.dump(config, open(config_path, 'w'))


def maker(method: str):
    """A ``family_harness`` family's ``make``: the quantized checkpoint at ``path`` and, returned, the
    transformers model of its dequantized weights."""
    def make(fields: dict, path: str, rng) -> LlamaForCausalLM:
        model = LlamaForCausalLM(LlamaConfig(**fields)).float().eval()
        write_quantized(model, path, method)
        return model
    return make


(families, jax_results, test_greedy_tokens_equal_the_reference,
 test_last_position_logits_match_transformers) = family_checks(
    {'llama-awq': (maker('awq'), SHAPE)}, reference_path=lambda name, path: dense_path(path),
    tp1_only={'llama-gptq': (maker('gptq'), SHAPE)})


def test_an_engine_checkpoint_keeps_the_weights_packed(families, tmp_path):
    """``lmdeploy_jax convert`` of a 4-bit checkpoint restores the same packed arrays (int32 codes,
    float16 scales and zeros), not arrays cast to the model dtype."""
    path = families['llama-awq']['path']
    dst = convert(path, str(tmp_path / 'engine'), 'float32')
    loaded, restored = (flat_state(load_model(ModelSource(p, p), 'float32').params) for p in (path, dst))
    assert restored[('layers', 'attn', 'qkv', 'qweight')].dtype == np.int32
    for key, value in loaded.items():
        assert restored[key].dtype == value.dtype and np.array_equal(np.asarray(restored[key]), np.asarray(value)), key
