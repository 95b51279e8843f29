"""GGUF files of Qwen2, Qwen3, Llama 3.2 and Mistral, written as llama.cpp's ``convert_hf_to_gguf.py`` writes
them (``gguf_export.py``) from tiny random checkpoints made by transformers' own classes, in F32 and
Q8_0, load on the JAX engine:

- the F32 file's conversion holds the checkpoint's weights exactly (llama.cpp's names mapped back,
  Llama's q/k rows un-permuted, Qwen's left as they are), and its config: Qwen3's head_dim from
  ``attention.key_length``, Qwen2's yarn rope from ``rope.scaling.*``, Llama 3.2's llama3 rope
  fitted back from the ``rope_freqs`` tensor, Mistral read as the Llama llama.cpp writes it (a
  checkpoint without a sliding window, as Mistral 7B v0.2 and v0.3); the Q8_0 file's weights are
  within its rounding;
- the JAX engine's greedy tokens (32 new tokens on 4 prompts) and ``get_ppl`` equal the PyTorch
  reference backend's (each family but Mistral, whose file is a Llama's): for F32, the reference
  run on the checkpoint the file came from; for Q8_0, the reference run on the same file (its
  dequantized weights).

Qwen2 and Llama 3.2 tie their embeddings (Qwen2.5-0.5B and Llama-3.2-1B do), so their files have
no ``output.weight``; Qwen3 unties them and has a head_dim (64) that is not hidden_size / heads (32).
Prompts run past the yarn and llama3 ropes' original context (32 and 16 positions).

A file whose metadata no supported model matches (rope factors that are not llama3's, a rope
scaling transformers cannot run, a value length other than the key length) is refused with a
CheckpointError naming the file and the field, and leaves nothing in the cache.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf_export import export_gguf
from safetensors.numpy import load_file
from test_engine_helpers import run_all
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from lmdeploy_jax.backends import check_supported
from lmdeploy_jax.checkpoint.errors import CheckpointError
from lmdeploy_jax.checkpoint.gguf_rope import llama3_factors
from lmdeploy_jax.checkpoint.source import ModelSource, resolve_model
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig
from lmdeploy_jax.models import is_supported

VOCAB, NEW_TOKENS, SESSION = 320, 32, 80
PROMPT_LENS = (5, 14, 27, 38)
SPECIAL_TOKENS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>')
TINY = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.15)
LLAMA3_ROPE = {'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 4.0, 'low_freq_factor': 1.0,
               'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}
YARN_ROPE = {'rope_type': 'yarn', 'rope_theta': 1e6, 'factor': 4.0, 'original_max_position_embeddings': 32}
# family -> (config class, model class, config, the tokenizer's pre-tokenizer name in llama.cpp)
FAMILIES = {
    'qwen2': (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, rope_parameters=YARN_ROPE), 'qwen2'),
    'qwen3': (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=64, tie_word_embeddings=False), 'qwen2'),
    'llama3.2': (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
                 'llama-bpe'),
    'mistral': (MistralConfig, MistralForCausalLM, dict(sliding_window=None, tie_word_embeddings=False), 'llama-bpe'),
}
GGUF_ARCHITECTURE = {'MistralForCausalLM': 'LlamaForCausalLM'}      # what llama.cpp writes it as
# the engine runs a Mistral file as the Llama it is (the llama3.2 case), so it is only converted here
ENGINE_FAMILIES = [name for name in FAMILIES if name != 'mistral']
KINDS = ('f32', 'q8_0')
CONFIG_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
                 'num_key_value_heads', 'head_dim', 'max_position_embeddings', 'tie_word_embeddings')


def save_byte_level_tokenizer(path: str) -> None:
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer and special tokens, trained on a few
    sentences to under ``VOCAB`` ids (the GGUF pads the rest, as llama.cpp does)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), 'isolated'),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(['The quick brown fox jumps over the lazy dog; Shanghai is in China, 1234.'] * 8,
                            trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token='<|im_end|>', pad_token='<|endoftext|>')
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               '{% endfor %}<|im_start|>assistant\n')
    tokenizer.save_pretrained(path)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory) -> dict[str, dict]:
    """Per family: the checkpoint's directory, its F32 and Q8_0 GGUF files, their converted
    directories (under a cache of this module's own), and 4 random prompts."""
    seed = int(np.random.SeedSequence().entropy % (1 << 30))
    print(f'gguf families seed {seed}')
    rng = np.random.default_rng(seed)
    root = tmp_path_factory.mktemp('gguf_families')
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('LMDEPLOY_JAX_CACHE', str(root / 'cache'))
        out = {}
        for name, (config_cls, model_cls, extra, pre) in FAMILIES.items():
            torch.manual_seed(int(rng.integers(1 << 30)))
            hf_dir = str(root / name)
            model_cls(config_cls(**TINY, **extra)).save_pretrained(hf_dir)
            save_byte_level_tokenizer(hf_dir)
            files = {kind: str(root / f'{name}-{kind}.gguf') for kind in KINDS}
            for kind, path in files.items():
                export_gguf(hf_dir, path, quantized=kind == 'q8_0', pre=pre)
            out[name] = dict(hf_dir=hf_dir, files=files, sources={k: resolve_model(p) for k, p in files.items()},
                             prompts=[rng.integers(0, VOCAB, n).tolist() for n in PROMPT_LENS])
        return out


def _greedy_tokens_and_ppl(engine, prompts) -> tuple[list[list[int]], list[float]]:
    try:
        gen = GenerationConfig(max_new_tokens=NEW_TOKENS)
        tokens = [r.tokens for r in run_all(engine, [EngineRequest(i, p, gen) for i, p in enumerate(prompts)])]
        return tokens, list(engine.get_ppl(prompts))
    finally:
        engine.close()


def reference_run(source: ModelSource, prompts):
    from lmdeploy_jax.pytorch.engine import PytorchEngine
    return _greedy_tokens_and_ppl(PytorchEngine(source, PytorchEngineConfig(device_type='cpu', session_len=SESSION)),
                                  prompts)


def jax_run(source: ModelSource, prompts):
    from lmdeploy_jax.engine import JaxEngine
    config = TurbomindEngineConfig(dtype='float32', session_len=SESSION, max_batch_size=4, cache_block_seq_len=16,
                                   num_cache_blocks=24)
    return _greedy_tokens_and_ppl(JaxEngine(source, config, decode_batch=[4], prefill_tokens=[64],
                                            prefill_batch=[4]), prompts)


@pytest.mark.parametrize('name', FAMILIES)
def test_the_f32_file_converts_to_the_checkpoints_weights(checkpoints, name):
    ckpt = checkpoints[name]
    source = ckpt['sources']['f32']
    expected, ours = load_file(os.path.join(ckpt['hf_dir'], 'model.safetensors')), _weights(source)
    assert sorted(ours) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    config, original = source.config_dict(), ModelSource(ckpt['hf_dir'], name).config_dict()
    architecture = original['architectures'][0]
    assert source.architecture == GGUF_ARCHITECTURE.get(architecture, architecture)
    assert 'quantization_config' not in config
    assert {k: config.get(k) for k in CONFIG_FIELDS} == {k: original.get(k) for k in CONFIG_FIELDS}
    assert np.float32(config['rms_norm_eps']) == np.float32(original['rms_norm_eps'])     # GGUF holds a float32
    rope, expected_rope = config['rope_parameters'], original['rope_parameters']
    if expected_rope['rope_type'] == 'llama3':          # fitted: other parameters, the same rope
        assert rope['rope_type'] == 'llama3' and rope['rope_theta'] == expected_rope['rope_theta']
        dim = config['hidden_size'] // config['num_attention_heads']
        np.testing.assert_allclose(llama3_factors(rope, rope['rope_theta'], dim),
                                   llama3_factors(expected_rope, rope['rope_theta'], dim), rtol=1e-6)
    else:
        assert rope == expected_rope


@pytest.mark.parametrize('name', FAMILIES)
def test_the_q8_0_file_converts_to_the_weights_within_its_rounding(checkpoints, name):
    """Q8_0 rounds each 32-value block to a multiple of its scale, its largest magnitude / 127 in
    float16: within half the scale, and 127 times the scale's float16 rounding (2**-11 of it)."""
    ckpt = checkpoints[name]
    expected, ours = load_file(os.path.join(ckpt['hf_dir'], 'model.safetensors')), _weights(ckpt['sources']['q8_0'])
    assert sorted(ours) == sorted(expected)
    for key, value in expected.items():
        if value.ndim == 1:        # norms and biases stay F32
            np.testing.assert_array_equal(ours[key], value, err_msg=key)
            continue
        blocks = value.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        error = np.abs(ours[key].reshape(-1, 32) - blocks)
        assert (error <= step * (0.5 + 127 * 2**-11)).all() and error.max() > 0, key


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('name', ENGINE_FAMILIES)
def test_the_jax_engine_runs_the_file_as_the_reference_does(checkpoints, name, kind):
    ckpt = checkpoints[name]
    source, prompts = ckpt['sources'][kind], ckpt['prompts']
    check_supported(source)
    assert is_supported(source.architecture)          # the JAX engine's, not the fallback's
    reference = ModelSource(ckpt['hf_dir'], name) if kind == 'f32' else source
    expected_tokens, expected_ppl = reference_run(reference, prompts)
    tokens, ppl = jax_run(source, prompts)
    assert tokens == expected_tokens
    assert all(len(t) == NEW_TOKENS for t in tokens)
    np.testing.assert_allclose(ppl, expected_ppl, rtol=0, atol=1e-4)


def _weights(source: ModelSource) -> dict[str, np.ndarray]:
    return load_file(os.path.join(source.hf_dir, 'model.safetensors'))


# ---- metadata that cannot be read as a supported model is refused, naming the file and the field ----

def _llama_gguf_with(tmp_path, monkeypatch, rng, extra) -> str:
    from test_gguf_cache import write_tiny_llama_gguf
    monkeypatch.setenv('LMDEPLOY_JAX_CACHE', str(tmp_path / 'cache'))
    path = str(tmp_path / 'tiny.gguf')
    write_tiny_llama_gguf(path, rng, extra)
    return path


def _refused(path: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as caught:
        resolve_model(path)
    assert caught.value.path == path
    assert os.listdir(os.path.join(os.environ['LMDEPLOY_JAX_CACHE'], 'gguf')) == []     # nothing left behind
    return caught.value


def test_rope_factors_that_are_not_llama3s_are_refused(tmp_path, monkeypatch, rng):
    """Factors rising and falling along the frequencies fit no llama3 rope."""
    factors = np.array([1.0, 3.0, 1.5, 4.0], dtype=np.float32)[rng.permutation(4)]
    while (np.diff(factors) >= 0).all():
        factors = factors[rng.permutation(4)]
    path = _llama_gguf_with(tmp_path, monkeypatch, rng, lambda w: w.add_tensor('rope_freqs.weight', factors))
    assert "tensor 'rope_freqs.weight' does not hold llama3 rope factors" in str(_refused(path))


def test_a_rope_scaling_type_transformers_cannot_run_is_refused(tmp_path, monkeypatch, rng):
    import gguf

    def longrope(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        writer.add_rope_scaling_factor(float(rng.uniform(2, 8)))
    path = _llama_gguf_with(tmp_path, monkeypatch, rng, longrope)
    assert "field 'llama.rope.scaling.type' is 'longrope'" in str(_refused(path))


def test_a_value_length_other_than_the_key_length_is_refused(tmp_path, monkeypatch, rng):
    def lengths(writer):
        writer.add_key_length(8)
        writer.add_value_length(int(rng.integers(9, 64)))
    path = _llama_gguf_with(tmp_path, monkeypatch, rng, lengths)
    assert "field 'llama.attention.value_length'" in str(_refused(path))
