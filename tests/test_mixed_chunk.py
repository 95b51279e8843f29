"""A mixed step (``step_batch.MixedBatch``: a decode segment and a prefill segment in one forward)
gives each row the hidden states and each layer the KV that the same rows get from a decode step
and a prefill step run one after the other, for the layer features attention treats apart:
sliding windows with a rope of their own and q/k norms over an int4 pool (whose keys are
Hadamard-rotated: Gemma 3), partial rotary dims over an int8 pool (GLM-4), and a mixture of
experts (Qwen3-MoE).
The engine's use of mixed steps is tested in ``test_engine_serving.py`` (tokens, sampling, no
compile after warm-up), ``test_engine_scheduler.py`` (planning) and ``test_tensor_parallel.py``
(tp=2)."""
from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
import torch
from family_harness import TINY
from test_family_gemma import FAMILIES as GEMMA
from test_family_glm4 import FAMILIES as GLM4
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from lmdeploy_jax.checkpoint.source import ModelSource
from lmdeploy_jax.engine.runner import host_step_batch
from lmdeploy_jax.messages import TurbomindEngineConfig
from lmdeploy_jax.models import MixedBatch, load_model

CASES = {   # name: (HF config class, model class, config fields), KV quant_policy
    'gemma3 int4 KV': (GEMMA['gemma3'], 4), 'glm4 int8 KV': (GLM4['glm4'], 8),
    'qwen3_moe': ((Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(vocab_size=300, moe_intermediate_size=64, num_experts=8,
                                                            num_experts_per_tok=2)), 0)}
BLOCK, MAX_BLOCKS = 8, 8
DECODE_ROWS, PREFILL_SHAPE = 4, (2, 32)


@pytest.mark.parametrize('name', sorted(CASES))
def test_a_mixed_step_equals_a_decode_step_then_a_prefill_step(name, tmp_path, rng):
    (config_cls, model_cls, extra), quant_policy = CASES[name]
    torch.manual_seed(int(rng.integers(1 << 30)))
    model_cls(config_cls(**{**TINY, **extra})).float().eval().save_pretrained(tmp_path)
    model = load_model(ModelSource(str(tmp_path), name), 'float32')
    vocab = model.spec.vocab_size
    tables = rng.permutation(np.arange(1, 1 + 4 * MAX_BLOCKS)).reshape(4, MAX_BLOCKS).tolist()
    # rows 0 and 1 decode (contexts of 11 and 29, past the window); rows 2 and 3 prefill 20 and 32 tokens,
    # row 3 behind 9 tokens already cached
    tokens = [rng.integers(0, vocab, n).tolist() for n in (12, 30, 20, 41)]
    forward = jax.jit(model.forward)

    def batch(rows, shape):
        return host_step_batch([(tokens[i][start:end], start, tables[i]) for i, start, end in rows], shape,
                               MAX_BLOCKS, BLOCK)

    kv = model.init_kv_caches(model.spec, 1 + 4 * MAX_BLOCKS, BLOCK, quant_policy)
    _, kv = forward(model.params, kv, batch([(0, 0, 11), (1, 0, 29)], PREFILL_SHAPE))
    _, kv = forward(model.params, kv, batch([(3, 0, 9)], PREFILL_SHAPE))
    decode = batch([(0, 11, 12), (1, 29, 30)], (DECODE_ROWS, 1))
    prefill = batch([(2, 0, 20), (3, 9, 41)], PREFILL_SHAPE)
    mixed = MixedBatch(decode, prefill)
    hidden, mixed_kv = forward(model.params, kv, mixed)
    decoded, kv = forward(model.params, kv, decode)
    prefilled, kv = forward(model.params, kv, prefill)
    np.testing.assert_allclose(np.asarray(mixed.last_hidden(hidden)),
                               np.concatenate([decode.last_hidden(decoded), prefill.last_hidden(prefilled)]),
                               rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(mixed_kv), jax.tree.leaves(kv)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('value', [1, 'yes', None])
def test_enable_mixed_chunk_takes_a_bool_only(value):
    with pytest.raises(ValueError, match=rf'^enable_mixed_chunk must be .*got {value!r}'):
        TurbomindEngineConfig(enable_mixed_chunk=value)


def test_a_fallback_to_the_pytorch_backend_names_the_settings_it_ignores(caplog):
    from lmdeploy_jax.backends import _convert_config
    from lmdeploy_jax.messages import PytorchEngineConfig
    config = TurbomindEngineConfig(enable_mixed_chunk=True, communicator='nccl', max_prefill_token_num=4096)
    with caplog.at_level(logging.WARNING, logger='lmdeploy_jax'):
        converted = _convert_config(config, PytorchEngineConfig)
        _convert_config(TurbomindEngineConfig(), PytorchEngineConfig)
    assert converted == PytorchEngineConfig(block_size=64)
    assert [r.getMessage() for r in caplog.records] == [
        "the pytorch backend ignores communicator='nccl', enable_mixed_chunk=True, max_prefill_token_num=4096 "
        '(settings of the turbomind engine)']
