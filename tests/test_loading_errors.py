"""Broken model files fail with a ``CheckpointError`` (a ``ValueError``) whose message names the file
and the fault, on both backends' paths, before any weight is read or anything is compiled: a
truncated or corrupt GGUF, a truncated or corrupt safetensors file, an invalid or incomplete
config.json, a missing tokenizer, and tensors that disagree with the config."""
from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from lmdeploy_jax import pipeline
from lmdeploy_jax.backends import check_supported
from lmdeploy_jax.checkpoint.errors import CheckpointError
from lmdeploy_jax.checkpoint.source import ModelSource, default_model_path
from lmdeploy_jax.models import load_model
from lmdeploy_jax.tokenizer import Tokenizer

VOCAB = 256
BACKENDS = ('turbomind', 'pytorch')


def save_word_tokenizer(path: str) -> None:
    """A word-level tokenizer of ``VOCAB`` ids (``t0`` ... ``t255``), saved as transformers saves one."""
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    raw = RawTokenizer(models.WordLevel({f't{i}': i for i in range(VOCAB)}, unk_token='t0'))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token='t0', eos_token='t1').save_pretrained(path)


@pytest.fixture(scope='module')
def intact(tmp_path_factory) -> str:
    """A tiny random Llama (GQA, untied lm_head) saved by transformers, with a tokenizer."""
    path = str(tmp_path_factory.mktemp('tiny_llama'))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    save_word_tokenizer(path)
    return path


@pytest.fixture
def model_dir(intact, tmp_path) -> str:
    """A copy of ``intact`` for one test to break."""
    return shutil.copytree(intact, str(tmp_path / 'model'))


def _refused(path: str, backend: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as caught:
        pipeline(path, backend=backend)
    assert isinstance(caught.value, ValueError)
    return caught.value


def _edit_config(model_dir: str, edit) -> str:
    path = os.path.join(model_dir, 'config.json')
    with open(path) as f:
        config = json.load(f)
    edit(config)
    with open(path, 'w') as f:
        json.dump(config, f)
    return path


def _rewrite_tensors(model_dir: str, edit) -> str:
    from safetensors.torch import load_file, save_file
    path = os.path.join(model_dir, 'model.safetensors')
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={'format': 'pt'})
    return path


def test_the_intact_checkpoint_passes_the_checks(intact):
    check_supported(ModelSource(intact, intact))
    assert Tokenizer(intact).vocab_size == VOCAB


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_truncated_gguf_names_the_file(backend, tmp_path, monkeypatch, rng):
    monkeypatch.setenv('LMDEPLOY_JAX_CACHE', str(tmp_path / 'cache'))
    source = default_model_path()
    if not os.path.exists(source):
        pytest.skip('the default model is not installed')
    size = int(rng.integers(os.path.getsize(source) // 8, os.path.getsize(source) - 1))
    path = str(tmp_path / 'SmolLM2.gguf')
    with open(source, 'rb') as src, open(path, 'wb') as dst:
        dst.write(src.read(size))
    error = _refused(path, backend)
    assert error.path == path and str(error).startswith(path) and 'truncated or corrupt' in str(error)
    assert os.listdir(tmp_path / 'cache' / 'gguf') == []      # the failed conversion left nothing


@pytest.mark.parametrize('content, fault', [(b'', 'is empty'), (b'PK\x03\x04' + bytes(60), 'is not a GGUF file')])
def test_a_file_that_is_not_gguf_names_the_file(content, fault, tmp_path, monkeypatch):
    monkeypatch.setenv('LMDEPLOY_JAX_CACHE', str(tmp_path / 'cache'))
    path = tmp_path / 'model.gguf'
    path.write_bytes(content)
    error = _refused(str(path), 'turbomind')
    assert error.path == str(path) and fault in str(error)


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_truncated_safetensors_file_names_the_file_and_a_tensor(backend, model_dir, rng):
    path = os.path.join(model_dir, 'model.safetensors')
    with open(path, 'rb') as f:
        header_end = 8 + struct.unpack('<Q', f.read(8))[0]
    os.truncate(path, int(rng.integers(header_end, os.path.getsize(path))))
    error = _refused(model_dir, backend)
    assert error.path == path and 'is truncated: tensor' in str(error)


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_safetensors_file_cut_inside_its_header_names_the_file(backend, model_dir, rng):
    path = os.path.join(model_dir, 'model.safetensors')
    os.truncate(path, int(rng.integers(0, 100)))
    error = _refused(model_dir, backend)
    assert error.path == path and 'is truncated' in str(error)


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_corrupt_safetensors_header_names_the_file(backend, model_dir, rng):
    path = os.path.join(model_dir, 'model.safetensors')
    with open(path, 'r+b') as f:
        f.seek(8 + int(rng.integers(0, 16)))
        f.write(b'\xff{{')
    error = _refused(model_dir, backend)
    assert error.path == path and 'corrupt header' in str(error)


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_config_that_is_not_json_names_the_file(backend, model_dir):
    path = os.path.join(model_dir, 'config.json')
    with open(path, 'a') as f:
        f.write('{"oops": ')
    error = _refused(model_dir, backend)
    assert error.path == path and 'is not valid JSON' in str(error) and 'line' in str(error)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('field', ['hidden_size', 'num_attention_heads', 'num_hidden_layers', 'vocab_size',
                                   'intermediate_size'])
def test_a_config_without_a_required_field_names_it(backend, field, model_dir):
    path = _edit_config(model_dir, lambda config: config.pop(field))
    error = _refused(model_dir, backend)
    assert error.path == path and f"field '{field}' is missing" in str(error)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('field, value', [('num_attention_heads', 0), ('num_key_value_heads', -2),
                                          ('hidden_size', '64'), ('num_hidden_layers', 1.5)])
def test_a_config_with_a_bad_size_names_the_field_and_value(backend, field, value, model_dir):
    path = _edit_config(model_dir, lambda config: config.update({field: value}))
    error = _refused(model_dir, backend)
    assert error.path == path and f"field '{field}' must be a positive integer, got {value!r}" in str(error)


@pytest.mark.parametrize('backend', BACKENDS)
def test_kv_heads_that_do_not_divide_the_heads_are_named(backend, model_dir):
    path = _edit_config(model_dir, lambda config: config.update(num_key_value_heads=3))
    error = _refused(model_dir, backend)
    assert error.path == path and 'num_key_value_heads (3) must divide num_attention_heads (4)' in str(error)


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_missing_tokenizer_names_the_directory(backend, model_dir):
    for name in os.listdir(model_dir):
        if name.startswith(('tokenizer', 'special_tokens')):
            os.remove(os.path.join(model_dir, name))
    error = _refused(model_dir, backend)
    assert error.path == model_dir and 'has no tokenizer' in str(error)
    with pytest.raises(CheckpointError, match='has no tokenizer'):
        Tokenizer(model_dir)


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_missing_tensor_is_named(backend, model_dir):
    path = _rewrite_tensors(model_dir, lambda t: t.pop('model.layers.1.mlp.down_proj.weight'))
    error = _refused(model_dir, backend)
    assert error.path == path and "tensor 'model.layers.1.mlp.down_proj.weight' is missing" in str(error)


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_tensor_of_another_shape_than_the_config_is_named(backend, model_dir, rng):
    name = f'model.layers.{int(rng.integers(0, 2))}.self_attn.k_proj.weight'

    def shrink(tensors):
        tensors[name] = tensors[name][:-16].clone()
    path = _rewrite_tensors(model_dir, shrink)
    error = _refused(model_dir, backend)
    assert error.path == path
    assert f"tensor '{name}' has shape (16, 64), but {model_dir}/config.json implies (32, 64)" in str(error)


def test_a_tensor_missing_from_a_checkpoint_only_the_reference_runs_is_named(tmp_path, rng):
    """GPT-2 runs on the pytorch backend alone: transformers would initialise the missing tensor
    at random, the engine refuses the checkpoint instead."""
    from transformers import GPT2Config, GPT2LMHeadModel
    path = str(tmp_path / 'gpt2')
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64)).save_pretrained(path)
    save_word_tokenizer(path)
    name = f'transformer.h.{int(rng.integers(0, 2))}.mlp.c_fc.weight'
    _rewrite_tensors(path, lambda t: t.pop(name))
    error = _refused(path, 'pytorch')
    assert error.path == path and f'tensors missing from the checkpoint: {name}' in str(error)


def test_the_jax_loader_checks_the_tensors_before_reading_them(model_dir):
    """Built directly (as the benchmarks build a JaxEngine), the loader refuses the same checkpoint."""
    _edit_config(model_dir, lambda config: config.update(intermediate_size=128))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \(64, 96\)"):
        load_model(ModelSource(model_dir, model_dir))


def test_an_untied_checkpoint_without_its_lm_head_is_named(model_dir):
    path = _rewrite_tensors(model_dir, lambda t: t.pop('lm_head.weight'))
    with pytest.raises(CheckpointError, match="tensor 'lm_head.weight' is missing") as caught:
        check_supported(ModelSource(model_dir, model_dir))
    assert caught.value.path == path
    # the tied form of the same checkpoint is fine
    _edit_config(model_dir, lambda config: config.update(tie_word_embeddings=True))
    check_supported(ModelSource(model_dir, model_dir))


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_rope_parameter_missing_from_the_config_names_the_file(backend, model_dir):
    path = _edit_config(model_dir, lambda config: config.update(
        rope_scaling={'rope_type': 'llama3', 'low_freq_factor': 1.0, 'high_freq_factor': 4.0}))
    error = _refused(model_dir, backend)
    assert error.path == path and "'factor'" in str(error)


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_missing_shard_of_a_sharded_checkpoint_names_the_index(backend, model_dir, rng):
    from safetensors.torch import load_file, save_file
    whole = os.path.join(model_dir, 'model.safetensors')
    tensors = load_file(whole)
    os.remove(whole)
    names = sorted(tensors)
    shards = {f'model-0000{i + 1}-of-00002.safetensors': names[i::2] for i in range(2)}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, os.path.join(model_dir, shard), metadata={'format': 'pt'})
    index = os.path.join(model_dir, 'model.safetensors.index.json')
    with open(index, 'w') as f:
        json.dump({'metadata': {}, 'weight_map': {n: s for s, ns in shards.items() for n in ns}}, f)
    check_supported(ModelSource(model_dir, model_dir))       # whole: fine
    gone = sorted(shards)[int(rng.integers(0, 2))]
    os.remove(os.path.join(model_dir, gone))
    error = _refused(model_dir, backend)
    assert error.path == index and f'lists shards that are missing: {gone}' in str(error)
