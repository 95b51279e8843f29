"""Model families on the JAX engine against the PyTorch reference backend: Mistral (a sliding window
in every layer), Qwen2 (sliding layers from ``max_window_layers``), Qwen3 (q/k norms, explicit
head_dim, sliding layers from ``layer_types``) and Llama 3.2 (tied embeddings, llama3 rope), each a
tiny random float32 checkpoint made by transformers' own class, with prompts longer than the
window. At tp=1 with the XLA reference kernels and at tp=2 (simulated CPU devices) with the Pallas
kernels in interpret mode (the GPU's kernels, each layer's window traced): the engine's greedy
tokens for 32 new tokens on 4 prompts equal the reference's, a fifth request that reuses the prefix
cache past the window too, and the decoder's last-position logits are within 1e-4 of transformers'.

The JAX side runs in one child process (``python test_model_families.py SPEC OUT``: this module is
its own worker), since the simulated device count is fixed when jax starts; see
``test_tensor_parallel.py``.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from test_engine_helpers import run_all
from test_models import PagedRun, _assert_logits_close
from test_tensor_parallel import _env
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from lmdeploy_jax.checkpoint.errors import CheckpointError
from lmdeploy_jax.checkpoint.source import ModelSource
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig
from lmdeploy_jax.models import load_model
from lmdeploy_jax.models.loader import check_checkpoint
from lmdeploy_jax.models.spec import LAYER_TYPES, sliding_windows
from lmdeploy_jax.pytorch.engine import PytorchEngine

WINDOW, NEW_TOKENS, SESSION = 8, 32, 80
KERNELS = {1: 'reference', 2: 'pallas_interpret'}      # tp -> LMDEPLOY_JAX_KERNELS
PROMPT_LENS = (5, 14, 27, 38)          # all but the first longer than the window
PREFIX = 32                            # the fifth prompt: the last one's first 32 tokens (2 blocks), then new ones
# head_dim 32: the attention kernels' narrowest heads
TINY = dict(hidden_size=128, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, initializer_range=0.15, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
LLAMA32_ROPE = {'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 4.0, 'low_freq_factor': 1.0,
                'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}
FAMILIES = {
    # one KV head: tp=2 repeats it
    'mistral': (MistralConfig, MistralForCausalLM, dict(vocab_size=300, num_key_value_heads=1, sliding_window=WINDOW)),
    # layers 1 and 2 slide, layer 0 is global; q/k/v biases
    'qwen2': (Qwen2Config, Qwen2ForCausalLM, dict(vocab_size=300, use_sliding_window=True, sliding_window=WINDOW,
                                                  max_window_layers=1)),
    # head_dim 64 is not hidden / heads; layers 0 and 2 slide
    'qwen3': (Qwen3Config, Qwen3ForCausalLM, dict(vocab_size=300, head_dim=64, use_sliding_window=True,
                                                  sliding_window=WINDOW, layer_types=[
                                                      'sliding_attention', 'full_attention', 'sliding_attention'])),
    # an odd vocabulary: tp=2 keeps the tied embedding whole
    'llama3.2': (LlamaConfig, LlamaForCausalLM, dict(vocab_size=301, tie_word_embeddings=True,
                                                     rope_parameters=LLAMA32_ROPE)),
}


def reference_tokens(path: str, prompts: list[list[int]]) -> list[list[int]]:
    """The PyTorch reference backend's greedy tokens for each prompt."""
    engine = PytorchEngine(ModelSource(path, path), PytorchEngineConfig(device_type='cpu', session_len=SESSION))
    try:
        return [r.tokens for r in run_all(engine, [EngineRequest(i, p, GenerationConfig(max_new_tokens=NEW_TOKENS))
                                                   for i, p in enumerate(prompts)])]
    finally:
        engine.close()


@pytest.fixture(scope='module')
def families(tmp_path_factory) -> dict[str, dict]:
    """Per family: the checkpoint's path, its 4 prompts and the prefix-cache prompt, the
    reference's tokens for them, transformers' last-position logits of the 4 prompts, and those of
    the same weights with no window (what the engine gave when it ignored the window)."""
    seed = int(np.random.SeedSequence().entropy % (1 << 30))
    print(f'families seed {seed}')
    rng = np.random.default_rng(seed)
    out = {}
    for name, (config_cls, model_cls, extra) in FAMILIES.items():
        torch.manual_seed(int(rng.integers(1 << 30)))
        config = config_cls(**{**TINY, **extra})
        hf = model_cls(config).float().eval()
        path = str(tmp_path_factory.mktemp(name))
        hf.save_pretrained(path)
        vocab = config.vocab_size
        prompts = [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENS]
        cached = prompts[-1][:PREFIX] + rng.integers(0, vocab, 6).tolist()
        with torch.no_grad():
            logits = [hf(torch.tensor([p])).logits[0, -1].numpy() for p in prompts]
            hf.config.sliding_window = 1 << 20          # wider than any prompt: no window
            unwindowed = [hf(torch.tensor([p])).logits[0, -1].numpy() for p in prompts]
        out[name] = dict(path=path, prompts=prompts, cached=cached, logits=logits, unwindowed=unwindowed,
                         tokens=reference_tokens(path, prompts + [cached]))
    return out


@pytest.fixture(scope='module')
def jax_results(families, tmp_path_factory) -> dict:
    """``{family: {tp: {'tokens', 'cached_tokens', 'prefix_hit_blocks', 'logits'}}}`` from the child."""
    tmp = tmp_path_factory.mktemp('jax')
    spec = {name: {k: f[k] for k in ('path', 'prompts', 'cached')} for name, f in families.items()}
    (tmp / 'spec.json').write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, str(tmp / 'spec.json'), str(tmp / 'out.json')],
                          env=_env(tmp, max(KERNELS)), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stderr[-2000:])
    return {name: {int(tp): r for tp, r in by_tp.items()}
            for name, by_tp in json.loads((tmp / 'out.json').read_text()).items()}


@pytest.mark.parametrize('tp', KERNELS)
@pytest.mark.parametrize('name', FAMILIES)
def test_greedy_tokens_equal_the_reference(families, jax_results, name, tp):
    expected, ours = families[name]['tokens'], jax_results[name][tp]
    assert all(len(t) == NEW_TOKENS for t in expected)
    assert ours['tokens'] == expected[:-1]
    # the fifth prompt's first two blocks came from the prefix cache; its window reaches into them
    assert ours['prefix_hit_blocks'] == PREFIX // 16
    assert ours['cached_tokens'] == expected[-1]


@pytest.mark.parametrize('tp', KERNELS)
@pytest.mark.parametrize('name', FAMILIES)
def test_last_position_logits_match_transformers(families, jax_results, name, tp):
    for ours, expected in zip(jax_results[name][tp]['logits'], families[name]['logits']):
        _assert_logits_close(np.asarray(ours, np.float32), expected)


@pytest.mark.parametrize('name', ['mistral', 'qwen2', 'qwen3'])
def test_the_window_changes_the_long_prompts_logits(families, name):
    """Ignoring the window gives other logits for the prompts longer than it (beyond the tolerance
    above), and the same for the one within it: the tests above fail on a model without windows."""
    f = families[name]
    for n, with_window, without in zip(PROMPT_LENS, f['logits'], f['unwindowed']):
        if n <= WINDOW:
            np.testing.assert_allclose(with_window, without, rtol=1e-5, atol=1e-5)
        else:
            assert np.abs(with_window - without).max() > 100 * 1e-4 * np.abs(with_window).max()


def test_qwen3_q_k_norms_are_loaded_and_required(families, tmp_path):
    """Qwen3's per-head norm weights are stacked ``[layers, head_dim]``; a checkpoint without one
    is refused, naming the tensor."""
    path = families['qwen3']['path']
    model = load_model(ModelSource(path, path))
    assert model.spec.qk_norm and model.spec.sliding_windows == (WINDOW, 0, WINDOW)
    head_dim = FAMILIES['qwen3'][2]['head_dim']
    layers = model.params['layers']
    assert layers['q_norm'].shape == layers['k_norm'].shape == (TINY['num_hidden_layers'], head_dim)
    tensors = load_file(f'{path}/model.safetensors')
    np.testing.assert_array_equal(np.asarray(layers['k_norm'][1]), tensors['model.layers.1.self_attn.k_norm.weight'])
    del tensors['model.layers.1.self_attn.k_norm.weight']
    save_file(tensors, str(tmp_path / 'model.safetensors'))
    shutil.copy(f'{path}/config.json', tmp_path)
    with pytest.raises(CheckpointError, match="'model.layers.1.self_attn.k_norm.weight' is missing"):
        check_checkpoint(ModelSource(str(tmp_path), str(tmp_path)))


def _transformers_windows(config) -> tuple[int, ...]:
    windows = tuple(config.sliding_window if t == 'sliding_attention' else 0 for t in config.layer_types)
    return windows if any(windows) else ()


def test_sliding_windows_are_read_as_transformers_reads_them(rng):
    """Qwen2/Qwen3's windows from random ``use_sliding_window``, ``max_window_layers`` and
    ``layer_types`` against transformers' configs; Mistral's in every layer, its ``layer_types``
    ignored; Llama has none; malformed fields are named."""
    for config_cls in (Qwen2Config, Qwen3Config):
        for _ in range(20):
            layers = int(rng.integers(1, 7))
            fields = dict(num_hidden_layers=layers, use_sliding_window=bool(rng.random() < 0.7),
                          sliding_window=int(rng.integers(1, 64)), max_window_layers=int(rng.integers(0, 8)))
            if rng.random() < 0.5 and fields['use_sliding_window']:
                fields['layer_types'] = [LAYER_TYPES[int(b)] for b in rng.random(layers) < 0.5]
            config = json.loads(config_cls(**fields).to_json_string())      # as save_pretrained writes it
            assert sliding_windows(config, 'per_layer', layers, 'c.json') == _transformers_windows(config_cls(**fields))
            # an older config.json without layer_types: max_window_layers decides, as in transformers
            config.pop('layer_types', None)
            fields.pop('layer_types', None)
            assert sliding_windows(config, 'per_layer', layers, 'c.json') == _transformers_windows(config_cls(**fields))
    mistral = {'sliding_window': 5, 'layer_types': ['full_attention'] * 3}
    assert sliding_windows(mistral, 'all_layers', 3, 'c.json') == (5, 5, 5)
    assert sliding_windows({}, 'all_layers', 2, 'c.json') == (MistralConfig().sliding_window,) * 2
    assert sliding_windows({'sliding_window': None}, 'all_layers', 2, 'c.json') == ()
    assert sliding_windows({'sliding_window': 5}, None, 2, 'c.json') == ()
    bad = [({'sliding_window': 0}, "'sliding_window' must be a positive integer"),
           ({'use_sliding_window': True, 'layer_types': ['full_attention']}, "'layer_types' must list"),
           ({'use_sliding_window': True, 'layer_types': ['full_attention', 'chunked']}, "'layer_types' must list"),
           ({'layer_types': ['sliding_attention', 'full_attention']}, 'no window')]
    for config, message in bad:
        with pytest.raises(CheckpointError, match=message):
            sliding_windows(config, 'per_layer', 2, 'c.json')


# ---- the child process: the JAX engine and decoder at each tp ----

def _jax_family(path: str, prompts: list[list[int]], cached: list[int], tp: int) -> dict:
    import os
    from lmdeploy_jax.engine import JaxEngine
    from lmdeploy_jax.parallel.mesh import make_tp_mesh
    os.environ['LMDEPLOY_JAX_KERNELS'] = KERNELS[tp]        # read when the steps are traced
    source = ModelSource(path, path)
    config = TurbomindEngineConfig(dtype='float32', tp=tp, session_len=SESSION, max_batch_size=4,
                                   cache_block_seq_len=16, num_cache_blocks=28, enable_prefix_caching=True)
    engine = JaxEngine(source, config, decode_batch=[4], prefill_tokens=[64], prefill_batch=[4])
    try:
        gen = GenerationConfig(max_new_tokens=NEW_TOKENS)
        tokens = [r.tokens for r in run_all(engine, [EngineRequest(i, p, gen) for i, p in enumerate(prompts)])]
        cached_tokens = run_all(engine, [EngineRequest(len(prompts), cached, gen)])[0].tokens
        hits = engine._scheduler.blocks.prefix_hit_blocks
    finally:
        engine.close()
    run = PagedRun(load_model(source, 'float32', make_tp_mesh(tp) if tp > 1 else None), prompts)
    logits = run.step([len(p) for p in prompts], max(map(len, prompts)))
    return dict(tokens=tokens, cached_tokens=cached_tokens, prefix_hit_blocks=hits,
                logits=[row[-1].tolist() for row in logits])


def main(spec_path: str, out_path: str) -> None:
    import time
    spec = json.loads(open(spec_path).read())
    out = {}
    for name, f in spec.items():
        for tp in KERNELS:
            start = time.perf_counter()
            out.setdefault(name, {})[tp] = _jax_family(f['path'], f['prompts'], f['cached'], tp)
            print(f'{name} tp={tp}: {time.perf_counter() - start:.1f} s', file=sys.stderr)
    with open(out_path, 'w') as fh:
        json.dump(out, fh)


if __name__ == '__main__':
    main(*sys.argv[1:])
