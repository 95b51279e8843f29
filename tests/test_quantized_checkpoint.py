"""A quantized checkpoint (a ``quantization_config`` in config.json) that no backend runs is refused
before anything loads, with an error naming the method (or the setting), whichever backend is asked
for and whether or not the JAX engine knows the architecture: never a missing ``q_proj.weight``,
never a fallback to the pytorch backend that then fails. The JAX engine loads 4-bit AWQ and GPTQ
(``test_w4a16_engine.py``); the pytorch backend refuses them too, and the JAX engine refuses their
settings it cannot run by name, and refuses a 4-bit mixture of experts naming its architecture.
Each checkpoint is a tiny random model saved by transformers, its linear weights then rewritten in
the method's own tensor layout and its method's config added to config.json."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from family_harness import TINY
from safetensors.torch import load_file, save_file
from test_family_moe import FAMILIES as MOE_FAMILIES
from test_loading_errors import VOCAB, save_word_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmdeploy_jax import pipeline
from lmdeploy_jax.backends import check_supported
from lmdeploy_jax.checkpoint.errors import CheckpointError
from lmdeploy_jax.checkpoint.quantization import UnsupportedQuantizationError
from lmdeploy_jax.checkpoint.source import ModelSource

GROUP = 32
LINEARS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'c_attn', 'c_proj', 'c_fc',
           'w1', 'w2', 'w3')      # GPT-2's c_*; Mixtral's experts' w*


def _ints(*shape):
    return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32)


# method -> (its quantization_config, the tensors that replace one linear's (out, in) ``weight``)
METHODS = {
    'awq': ({'quant_method': 'awq', 'bits': 4, 'group_size': GROUP, 'zero_point': True, 'version': 'gemm'},
            lambda o, i: {'qweight': _ints(i, o // 8), 'qzeros': _ints(i // GROUP, o // 8),
                          'scales': torch.rand(i // GROUP, o).half()}),
    'gptq': ({'quant_method': 'gptq', 'bits': 4, 'group_size': GROUP, 'desc_act': False, 'sym': True},
             lambda o, i: {'qweight': _ints(i // 8, o), 'qzeros': _ints(i // GROUP, o // 8),
                           'scales': torch.rand(i // GROUP, o).half(),
                           'g_idx': torch.arange(i, dtype=torch.int32) // GROUP}),
    'fp8': ({'quant_method': 'fp8', 'activation_scheme': 'dynamic', 'weight_block_size': [GROUP, GROUP]},
            lambda o, i: {'weight': torch.randn(o, i).to(torch.float8_e4m3fn),
                          'weight_scale_inv': torch.rand(o // GROUP, i // GROUP)}),
    'compressed-tensors': ({'quant_method': 'compressed-tensors', 'format': 'pack-quantized',
                            'quantization_status': 'compressed', 'ignore': ['lm_head'],
                            'config_groups': {'group_0': {'targets': ['Linear'], 'weights': {
                                'num_bits': 4, 'type': 'int', 'symmetric': True, 'strategy': 'group',
                                'group_size': GROUP}}}},
                           lambda o, i: {'weight_packed': _ints(o, i // 8),
                                         'weight_scale': torch.rand(o, i // GROUP).bfloat16(),
                                         'weight_shape': torch.tensor([o, i])}),
    # written by transformers before quant_method was saved: load_in_4bit names the method
    'bitsandbytes': ({'load_in_4bit': True, 'bnb_4bit_quant_type': 'nf4', 'bnb_4bit_compute_dtype': 'bfloat16'},
                     lambda o, i: {'weight': torch.randint(0, 255, (o * i // 2, 1), dtype=torch.uint8),
                                   'weight.absmax': torch.rand(o * i // 64),
                                   'weight.quant_map': torch.randn(16)}),
}
BACKENDS = ('turbomind', 'pytorch')
JAX_METHODS = ('awq', 'gptq')      # loaded by the JAX engine


def quantize_layout(path: str, method: str) -> str:
    """Rewrite the checkpoint at ``path`` as ``method`` stores it (random quantized tensors in place
    of each linear weight, its config in config.json); returns config.json's path."""
    quant_config, layout = METHODS[method]
    weights = os.path.join(path, 'model.safetensors')
    tensors = {}
    for name, tensor in load_file(weights).items():
        module, _, leaf = name.rpartition('.')
        linear = module.rpartition('.')[2]
        if leaf == 'weight' and linear in LINEARS:
            out_dim, in_dim = tensor.shape[::-1] if linear.startswith('c_') else tensor.shape  # GPT-2: (in, out)
            tensors.update({f'{module}.{k}': v for k, v in layout(out_dim, in_dim).items()})
        else:
            tensors[name] = tensor
    save_file(tensors, weights, metadata={'format': 'pt'})
    return set_quantization_config(path, quant_config)


def set_quantization_config(path: str, value) -> str:
    """Put ``value`` in config.json's ``quantization_config``; returns config.json's path."""
    config_path = os.path.join(path, 'config.json')
    with open(config_path) as f:
        config = json.load(f)
    config['quantization_config'] = value
    with open(config_path, 'w') as f:
        json.dump(config, f)
    return config_path


@pytest.fixture(scope='module')
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """A tiny random Llama (the JAX engine's) and GPT-2 (the pytorch backend's alone), with tokenizers,
    and the mixtures of experts of ``test_family_moe.py`` (no tokenizer: they are refused before)."""
    root = tmp_path_factory.mktemp('tiny')
    llama = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    gpt2 = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=64)
    paths = {}
    for name, model in (('llama', LlamaForCausalLM(llama)), ('gpt2', GPT2LMHeadModel(gpt2))):
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        save_word_tokenizer(paths[name])
    for name, (config_cls, model_cls, extra) in MOE_FAMILIES.items():
        paths[name] = str(root / name)
        model_cls(config_cls(**{**TINY, **extra})).save_pretrained(paths[name])
    return paths


@pytest.fixture
def copy_of(tiny_models, tmp_path):
    return lambda name: shutil.copytree(tiny_models[name], str(tmp_path / name))


def _assert_names_the_method(error: UnsupportedQuantizationError, config_path: str, method: str) -> None:
    assert isinstance(error, ValueError) and error.method == method and error.path == config_path
    assert str(error).startswith(f"{config_path}: quantization method '{method}' is not supported")


@pytest.mark.parametrize('method, backend', [(m, b) for m in METHODS for b in BACKENDS
                                             if b == 'pytorch' or m not in JAX_METHODS])
def test_a_quantized_checkpoint_is_refused_naming_its_method(method, backend, copy_of):
    """Every method on the pytorch backend; all but AWQ and GPTQ on the JAX engine."""
    path = copy_of('llama')
    config_path = quantize_layout(path, method)
    with pytest.raises(UnsupportedQuantizationError) as caught:
        pipeline(path, backend=backend)
    _assert_names_the_method(caught.value, config_path, method)


def test_the_jax_loader_refuses_it_too(copy_of):
    """Built directly (as the benchmarks build a JaxEngine), the loader names the method, not a
    missing ``q_proj.weight``."""
    from lmdeploy_jax.checkpoint.source import ModelSource
    from lmdeploy_jax.models import load_model
    path = copy_of('llama')
    config_path = quantize_layout(path, 'fp8')
    with pytest.raises(UnsupportedQuantizationError) as caught:
        load_model(ModelSource(path, path))
    _assert_names_the_method(caught.value, config_path, 'fp8')


@pytest.mark.parametrize('method', ['awq', 'fp8'])
def test_an_architecture_only_the_fallback_runs_is_refused_too(method, copy_of, caplog):
    """GPT-2 on backend='turbomind' would fall back to the pytorch backend: refused before that."""
    path = copy_of('gpt2')
    config_path = quantize_layout(path, method)
    with pytest.raises(UnsupportedQuantizationError) as caught:
        pipeline(path, backend='turbomind')
    _assert_names_the_method(caught.value, config_path, method)
    assert 'falling back' not in caplog.text


@pytest.mark.parametrize('name, method, load', [('qwen3_moe', 'awq', 'pipeline'), ('qwen2_moe', 'gptq', 'pipeline'),
                                                ('mixtral', 'awq', 'load_model')])
def test_a_4bit_mixture_of_experts_is_refused_naming_it(name, method, load, copy_of):
    """The experts run from float weights only: an AWQ/GPTQ checkpoint of a MoE family is refused
    naming the architecture and model_format, from config.json alone (not a missing expert
    ``weight``), by the pipeline and by the loader; even where another setting would be refused."""
    from lmdeploy_jax.models import load_model
    path = copy_of(name)
    config_path = quantize_layout(path, method)
    architecture = json.load(open(config_path))['architectures'][0]
    if name == 'qwen2_moe':
        set_quantization_config(path, {**METHODS[method][0], 'modules_to_not_convert': ['gate']})
    with pytest.raises(UnsupportedQuantizationError) as caught:
        pipeline(path, backend='turbomind') if load == 'pipeline' else load_model(ModelSource(path, path))
    _assert_names_the_method(caught.value, config_path, method)
    assert (f'4-bit ({method}) weights for mixture-of-experts layers are not supported by the JAX engine '
            f"(architecture {architecture}, model_format='{method}')") in str(caught.value)


def test_quantization_settings_over_plain_weights_are_refused(copy_of):
    """The method's config alone is enough: its settings would be ignored, not applied."""
    path = copy_of('llama')
    config_path = set_quantization_config(path, METHODS['fp8'][0])
    with pytest.raises(UnsupportedQuantizationError) as caught:
        check_supported(ModelSource(path, path))
    _assert_names_the_method(caught.value, config_path, 'fp8')


@pytest.mark.parametrize('method, setting, fault', [
    ('awq', {'bits': 8}, 'bits=8: only 4-bit weights'),
    ('awq', {'version': 'gemv'}, "version='gemv': only AutoAWQ's GEMM packing"),
    ('awq', {'group_size': 100}, 'group_size=100: groups of a multiple of 8 rows'),
    ('gptq', {'desc_act': True}, 'desc_act=True: act-order (desc_act) GPTQ checkpoints are not supported'),
    ('gptq', {'checkpoint_format': 'gptq_v2'}, "checkpoint_format='gptq_v2'"),
    ('awq', {'modules_to_not_convert': ['mlp']}, "modules_to_not_convert=['mlp']: layers left unquantized")])
def test_awq_gptq_settings_the_engine_cannot_run_are_named(method, setting, fault, copy_of):
    path = copy_of('llama')
    config_path = set_quantization_config(path, {**METHODS[method][0], **setting})
    with pytest.raises(UnsupportedQuantizationError, match=re.escape(f'quantization_config.{fault}')) as caught:
        check_supported(ModelSource(path, path))
    _assert_names_the_method(caught.value, config_path, method)


def test_inputs_not_in_whole_groups_are_refused(copy_of):
    """The tiny Llama's 128-wide hidden states are half a group of 256."""
    path = copy_of('llama')
    quantize_layout(path, 'awq')
    set_quantization_config(path, {**METHODS['awq'][0], 'group_size': 256})
    with pytest.raises(ValueError, match="4-bit qkv and gate_up projection's 128 inputs cannot be split"):
        check_supported(ModelSource(path, path))


def test_model_format_must_match_the_checkpoint(copy_of):
    from lmdeploy_jax.messages import TurbomindEngineConfig
    path = copy_of('llama')
    with pytest.raises(ValueError, match="model_format='awq' does not match the checkpoint: .* unquantized"):
        pipeline(path, backend_config=TurbomindEngineConfig(model_format='awq'))
    with pytest.raises(ValueError, match="model_format='awq' .* is loaded by the turbomind backend only"):
        pipeline(path, backend='pytorch', backend_config=TurbomindEngineConfig(model_format='awq'))
    with pytest.raises(ValueError, match='model_format'):
        TurbomindEngineConfig(model_format='fp8')


@pytest.mark.parametrize('value, fault', [('awq', "must be an object, got 'awq'"),
                                          ({'bits': 4}, "names no 'quant_method'"),
                                          ({'quant_method': ''}, "names no 'quant_method'")])
def test_a_malformed_quantization_config_names_the_field(value, fault, copy_of):
    path = copy_of('llama')
    config_path = set_quantization_config(path, value)
    with pytest.raises(CheckpointError) as caught:
        pipeline(path, backend='pytorch')
    assert caught.value.path == config_path
    assert f"field 'quantization_config' {fault}" in str(caught.value)
