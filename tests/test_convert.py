"""``lmdeploy_jax convert``: a Hugging Face directory or a GGUF file -> an engine checkpoint (Orbax),
restored bitwise (float32) at tp=1 and into the shardings of a tp=2 / tp=4 mesh of simulated CPU
devices (KV heads repeated at tp=4), giving the same greedy tokens as the directory it came from;
and back to Hugging Face safetensors, bitwise, for every family the JAX engine supports."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx
from flax.nnx import traversals
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from family_harness import TINY as FAMILY_TINY
from gguf_export import export_gguf
from lmdeploy_jax.backends import check_supported
from lmdeploy_jax.checkpoint.engine_checkpoint import METADATA_FILE
from lmdeploy_jax.checkpoint.errors import CheckpointError
from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.cli.main import main as cli
from lmdeploy_jax.models import load_model
from lmdeploy_jax.models.registry import family
from lmdeploy_jax.models.weight_map import Tensor
from test_family_gemma import FAMILIES as GEMMA
from test_family_glm4 import FAMILIES as GLM4
from test_family_internlm import FAMILIES as INTERNLM
from test_family_moe import FAMILIES as MOE
from test_family_phi3 import FAMILIES as PHI3
from test_gguf_families import save_byte_level_tokenizer
from test_model_families import FAMILIES as DENSE
from test_tensor_parallel import TINY, _env, _run_worker

from convert import convert

# every family of the engine, as its tests build it: packed (phi3, glm4 gate_up), permuted (glm4 q/k,
# internlm2's grouped wqkv), offset norms (gemma), experts (moe)
FAMILIES = {**DENSE, **PHI3, **GLM4, **GEMMA, **MOE, **INTERNLM}

COMPARE_AT_TP = """
import sys
import numpy as np
from flax import nnx
from flax.nnx import traversals
from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.models import load_model
from lmdeploy_jax.models.registry import family
from lmdeploy_jax.models.weight_map import Tensor
from lmdeploy_jax.parallel import make_tp_mesh
hf, converted = sys.argv[1:3]
for tp in map(int, sys.argv[3:]):
    mesh = make_tp_mesh(tp)
    a, b = (traversals.flatten_mapping(nnx.to_pure_dict(load_model(resolve_model(p), mesh=mesh).params))
            for p in (hf, converted))
    assert a.keys() == b.keys()
    for path in a:
        assert a[path].shape == b[path].shape and a[path].dtype == b[path].dtype, path
        assert a[path].sharding.is_equivalent_to(b[path].sharding, a[path].ndim), (path, b[path].sharding)
        for sa, sb in zip(a[path].addressable_shards, b[path].addressable_shards):
            assert sa.device == sb.device and sa.index == sb.index, path
            assert np.array_equal(np.asarray(sa.data), np.asarray(sb.data)), (tp, path)
    print(f'tp={tp}: {len(a)} parameters equal shard by shard')
"""


def _flat(model) -> dict:
    return traversals.flatten_mapping(nnx.to_pure_dict(model.params))


def assert_bitwise_equal(a, b) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        assert fa[path].dtype == fb[path].dtype, path
        assert np.array_equal(np.asarray(fa[path]).view(np.uint8), np.asarray(fb[path]).view(np.uint8)), path
    assert a.spec == b.spec


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> dict[str, str]:
    """A tiny random float32 Llama (2 KV heads), its GGUF file and their engine checkpoints."""
    torch.manual_seed(int(np.random.SeedSequence().entropy % (1 << 30)))
    root = tmp_path_factory.mktemp('convert')
    hf = str(root / 'hf')
    LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=False)).save_pretrained(hf)
    save_byte_level_tokenizer(hf)
    export_gguf(hf, str(root / 'tiny.gguf'))
    paths = {'hf': hf, 'gguf': str(root / 'tiny.gguf'), 'root': str(root)}
    paths['engine'] = convert(hf, str(root / 'engine'))
    return paths


def test_restore_is_bitwise_and_keeps_the_model_files(checkpoint):
    engine = checkpoint['engine']
    assert {'config.json', 'tokenizer.json', METADATA_FILE, 'params'} <= set(os.listdir(engine))
    assert not any(name.endswith('.safetensors') for name in os.listdir(engine))
    source = resolve_model(engine)
    assert source.is_engine_checkpoint and not resolve_model(checkpoint['hf']).is_engine_checkpoint
    check_supported(source)      # pipeline()'s checks before loading
    assert_bitwise_equal(load_model(resolve_model(checkpoint['hf'])), load_model(source))
    # another dtype than the one stored: cast while restoring, as the loader casts the safetensors
    assert_bitwise_equal(load_model(resolve_model(checkpoint['hf']), 'bfloat16'), load_model(source, 'bfloat16'))


def test_the_pytorch_backend_refuses_an_engine_checkpoint(checkpoint):
    from lmdeploy_jax.backends import create_backend
    with pytest.raises(ValueError, match=r'is an engine checkpoint .* only the turbomind backend loads'):
        create_backend(resolve_model(checkpoint['engine']), 'pytorch', None)


def test_cli_converts_a_gguf_file_to_bfloat16(checkpoint, capsys):
    dst = os.path.join(checkpoint['root'], 'from_gguf_bf16')
    assert cli(['convert', checkpoint['gguf'], '--dst-path', dst, '--dtype', 'bfloat16']) == 0
    assert dst in capsys.readouterr().out
    restored = load_model(resolve_model(dst))
    assert restored.spec.dtype.name == 'bfloat16'
    assert_bitwise_equal(load_model(resolve_model(checkpoint['gguf']), 'bfloat16'), restored)
    with open(os.path.join(dst, METADATA_FILE)) as f:
        assert json.load(f)['dtype'] == 'bfloat16'


def test_converted_checkpoint_restores_into_any_tp_shardings(checkpoint, tmp_path):
    """Written at tp=1, restored at tp=2 and tp=4 (8 query heads over 2 KV heads: each repeated
    twice) exactly as the engine loads the Hugging Face directory over the same mesh."""
    proc = subprocess.run([sys.executable, '-c', COMPARE_AT_TP, checkpoint['hf'], checkpoint['engine'], '2', '4'],
                          env=_env(tmp_path, 4), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'tp=4: 9 parameters equal' in proc.stdout


def test_converted_greedy_tokens_equal_the_hf_directory(checkpoint, tmp_path):
    env = _env(tmp_path, 2)
    from_hf = _run_worker(env, '--model', checkpoint['hf'], '--tp', '1')
    from_engine = _run_worker(env, '--model', checkpoint['engine'], '--tp', '1', '2')
    assert all(len(tokens) == 6 for tokens in from_hf[1])
    assert from_engine[1] == from_hf[1] and from_engine[2] == from_hf[1]


def test_refuses_a_non_empty_destination_and_a_broken_checkpoint(checkpoint, tmp_path):
    with pytest.raises(ValueError, match='exists and is not an empty directory'):
        convert(checkpoint['hf'], checkpoint['engine'])
    assert cli(['convert', checkpoint['hf'], '--dst-path', checkpoint['engine']]) == 2
    broken = tmp_path / 'broken'
    convert(checkpoint['hf'], str(broken))
    meta = json.loads((broken / METADATA_FILE).read_text())
    (broken / METADATA_FILE).write_text(json.dumps({**meta, 'architecture': 'Qwen2ForCausalLM'}))
    with pytest.raises(CheckpointError, match="architecture 'Qwen2ForCausalLM' is not config.json's"):
        load_model(resolve_model(str(broken)))
    (broken / METADATA_FILE).write_text(json.dumps({**meta, 'version': 99}))
    with pytest.raises(CheckpointError, match='convert the model again'):
        load_model(resolve_model(str(broken)))


def _offset_tensors(spec) -> dict[str, float]:
    """The checkpoint tensors the engine stores plus a constant (Gemma's norms: ``1 + w``), by name."""
    return {source.name.format(i=i): source.add for source in family(spec.architecture).weight_map(spec).values()
            if isinstance(source, Tensor) and source.add for i in range(spec.num_layers)}


def _safetensors(directory: str) -> dict[str, np.ndarray]:
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith('.safetensors'):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_hf_to_engine_to_hf_is_bitwise(name, tmp_path, rng):
    family = FAMILIES[name]
    torch.manual_seed(int(rng.integers(1 << 30)))
    hf = str(tmp_path / 'hf')
    os.makedirs(hf)
    if len(family) == 2:             # a layout transformers lacks, written from a Llama's weights
        make, extra = family
        make({**FAMILY_TINY, **extra}, hf, rng)
    else:                            # every weight random, the norms too (transformers starts Gemma's at 0)
        config_cls, model_cls, extra = family
        model = model_cls(config_cls(**{**FAMILY_TINY, **extra})).float()
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.randn_like(param) * 0.3)
        model.save_pretrained(hf)
    engine, back = str(tmp_path / 'engine'), str(tmp_path / 'back')
    convert(hf, engine)
    assert cli(['convert', engine, '--dst-path', back, '--dst-format', 'hf']) == 0
    original, exported = _safetensors(hf), _safetensors(back)
    assert sorted(exported) == sorted(original)
    offsets = _offset_tensors(load_model(resolve_model(engine)).spec)
    for tensor, value in original.items():
        assert exported[tensor].dtype == value.dtype and exported[tensor].shape == value.shape, tensor
        if tensor in offsets:        # stored as 1 + w in float32: w comes back as (1 + w) - 1
            value = (value + np.float32(offsets[tensor])) - np.float32(offsets[tensor])
        assert np.array_equal(exported[tensor].view(np.uint8), value.view(np.uint8)), tensor
    assert set(os.listdir(hf)) - {'model.safetensors'} <= set(os.listdir(back))
