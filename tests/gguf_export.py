"""Shared by the GGUF tests (no tests here): a transformers checkpoint directory written as a GGUF file
the way llama.cpp's ``convert_hf_to_gguf.py`` writes it, through the ``gguf`` package's writer and
name tables, so the tests read files laid out as real ones are:

- metadata: ``general.architecture``, ``{arch}.block_count``, ``context_length``,
  ``embedding_length``, ``feed_forward_length``, ``attention.head_count``, ``head_count_kv``,
  ``rope.freq_base``, ``attention.layer_norm_rms_epsilon``, ``attention.key_length`` and
  ``value_length`` when config.json gives ``head_dim``, ``rope.scaling.*`` of a ``linear`` or
  ``yarn`` rope (``TextModel.set_gguf_parameters``), ``general.file_type``; for Llama also
  ``vocab_size`` and ``rope.dimension_count`` (``LlamaModel.set_gguf_parameters``);
- a ``llama3`` rope as the tensor ``rope_freqs.weight`` (``LlamaModel.generate_extra_tensors``);
- the tokenizer as ``_set_vocab_gpt2`` writes it: ``tokenizer.ggml.model`` ``gpt2``, the ``pre``
  name, the tokens in id order padded to ``vocab_size`` with ``[PAD{i}]`` (type UNUSED), added
  special tokens typed CONTROL, then ``gguf.SpecialVocab`` (merges, special ids, chat template);
- tensors renamed by ``gguf.get_tensor_name_map`` (``blk.{i}.attn_q.weight``, ...); ``lm_head``
  left out of a tied checkpoint; Llama's q/k rows permuted to llama.cpp's rotary layout
  (``LlamaModel.permute``), Qwen2's and Qwen3's left as they are;
- ``Q8_0``: every tensor of two or more dimensions quantized (not the norms, nor biases, which stay
  F32), F16 where a row does not split into 32-element blocks (``prepare_tensors``).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
from safetensors.numpy import load_file

# llama.cpp writes Mistral as a Llama (``MistralModel(LlamaModel)``), with no sliding window
ARCHS = {'LlamaForCausalLM': 'LLAMA', 'MistralForCausalLM': 'LLAMA', 'Qwen2ForCausalLM': 'QWEN2',
         'Qwen3ForCausalLM': 'QWEN3'}
PERMUTED = ('LlamaForCausalLM', 'MistralForCausalLM')


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: each head's rotary halves interleaved."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _write_rope_scaling(writer, rope: dict) -> None:
    import gguf
    if rope.get('rope_type') == 'linear':
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope['factor'])
    elif rope.get('rope_type') == 'yarn':
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope['factor'])
        writer.add_rope_scaling_orig_ctx_len(rope['original_max_position_embeddings'])
        for name, add in (('attention_factor', writer.add_rope_scaling_yarn_attn_factor),
                          ('beta_fast', writer.add_rope_scaling_yarn_beta_fast),
                          ('beta_slow', writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(name) is not None:
                add(rope[name])


def _llama3_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for a llama3 rope (``LlamaModel.generate_extra_tensors``)."""
    freqs = 1.0 / (rope['rope_theta'] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, old_len = rope.get('factor', 8.0), rope.get('original_max_position_embeddings', 8192)
    low, high = rope.get('low_freq_factor', 1.0), rope.get('high_freq_factor', 4.0)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _head_dim(config: dict) -> int:
    return config.get('head_dim') or config['hidden_size'] // config['num_attention_heads']


def _write_metadata(writer, config: dict, file_type) -> None:
    writer.add_block_count(config['num_hidden_layers'])
    writer.add_context_length(config['max_position_embeddings'])
    writer.add_embedding_length(config['hidden_size'])
    writer.add_feed_forward_length(config['intermediate_size'])
    writer.add_head_count(config['num_attention_heads'])
    writer.add_head_count_kv(config['num_key_value_heads'])
    rope = config.get('rope_parameters') or {}
    writer.add_rope_freq_base(float(rope.get('rope_theta', config.get('rope_theta', 10000.0))))
    writer.add_layer_norm_rms_eps(config['rms_norm_eps'])
    if config.get('head_dim') is not None:
        writer.add_key_length(config['head_dim'])
        writer.add_value_length(config['head_dim'])
    _write_rope_scaling(writer, rope)
    writer.add_file_type(file_type)
    if config['architectures'][0] in PERMUTED:
        writer.add_vocab_size(config['vocab_size'])
        writer.add_rope_dimension_count(_head_dim(config))


def _write_vocab(writer, hf_dir: str, vocab_size: int, pre: str) -> None:
    import gguf
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f'[PAD{i}]')
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in added and added[i].special else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model('gpt2')
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=True).add_to_gguf(writer)


def _tensors(hf_dir: str, config: dict, arch, quantized: bool):
    """``(gguf name, data, raw dtype)`` of each tensor, in the checkpoint's order."""
    import gguf
    name_map = gguf.get_tensor_name_map(arch, config['num_hidden_layers'])
    heads = {'q_proj': config['num_attention_heads'], 'k_proj': config['num_key_value_heads']}
    for name, data in load_file(os.path.join(hf_dir, 'model.safetensors')).items():
        new_name = name_map.get_name(name, try_suffixes=('.weight', '.bias'))
        assert new_name is not None, f'llama.cpp has no name for {name}'
        data = data.astype(np.float32)
        module = name.rsplit('.', 2)[-2]
        if config['architectures'][0] in PERMUTED and module in heads:
            data = _permute(data, heads[module])
        qtype = gguf.GGMLQuantizationType.F32
        if quantized and data.ndim >= 2 and not new_name.endswith('_norm.weight'):
            qtype = (gguf.GGMLQuantizationType.Q8_0 if data.shape[-1] % 32 == 0
                     else gguf.GGMLQuantizationType.F16)
        yield new_name, gguf.quants.quantize(data, qtype), qtype


def export_gguf(hf_dir: str, path: str, quantized: bool = False, pre: str = 'qwen2') -> None:
    """Write the float checkpoint at ``hf_dir`` (one ``model.safetensors``, a byte-level BPE
    tokenizer) as the GGUF file ``path``: float32 (llama.cpp's ``--outtype f32``), or ``Q8_0``
    (``--outtype q8_0``) when ``quantized``."""
    import gguf
    with open(os.path.join(hf_dir, 'config.json')) as f:
        config = json.load(f)
    arch = getattr(gguf.MODEL_ARCH, ARCHS[config['architectures'][0]])
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quantized else gguf.LlamaFileType.ALL_F32
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(f'Tiny {os.path.basename(hf_dir)}')        # as llama.cpp names it, from the folder
    _write_metadata(writer, config, file_type)
    _write_vocab(writer, hf_dir, config['vocab_size'], pre)
    rope = config.get('rope_parameters') or {}
    if rope.get('rope_type') == 'llama3':
        writer.add_tensor('rope_freqs.weight', _llama3_rope_freqs(rope, _head_dim(config)))
    for name, data, qtype in _tensors(hf_dir, config, arch, quantized):
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
