"""GGUF file -> cached Hugging Face directory, dequantized once.

``transformers`` reads GGUF (llama.cpp's tensor names mapped back to its own, Llama's q/k rows
un-permuted, weights dequantized to float32, tokenizer and chat template from the metadata) but
takes tens of seconds to do it; the result is written once to a cache directory keyed by the file's
path, size and modification time (``conversion_cache.py``), and every later start loads that
directory. Metadata that transformers' table leaves out for an architecture (the head_dim, and the
rope scaling of ``gguf_rope.py``) is read here (``_apply_metadata``), so the directory's config.json
gives the model the file describes.
"""
from __future__ import annotations

import logging
import os
import shutil

from . import conversion_cache
from .errors import CheckpointError
from .gguf_rope import gguf_rope_parameters

logger = logging.getLogger('lmdeploy_jax')


GGUF_MAGIC = b'GGUF'


def read_gguf(path: str):
    """The file's ``gguf.GGUFReader``; CheckpointError naming the file when it is empty, not a GGUF
    file, or truncated or corrupt (the reader fails, or a tensor's data ends past the file's end)."""
    from gguf import GGUFReader
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        fault = 'is empty' if size == 0 else f'is not a GGUF file: it begins with {magic!r}, not {GGUF_MAGIC!r}'
        raise CheckpointError(path, fault)
    try:
        reader = GGUFReader(path)
    except (ValueError, MemoryError, OverflowError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f'is truncated or corrupt: reading it fails with {type(e).__name__}: '
                                    f'{e or "(no message)"}') from None
    ends = [int(t.data_offset) + int(t.n_bytes) for t in reader.tensors]
    if ends and max(ends) > size:
        raise CheckpointError(path, f'is truncated: its tensors end at byte {max(ends)}, but the file '
                                    f'holds {size} bytes')
    return reader


def gguf_architecture(path: str) -> str:
    """The ``general.architecture`` field of a GGUF file (CheckpointError when it has none)."""
    return _architecture(path, read_gguf(path))


def _architecture(path: str, reader) -> str:
    field = reader.fields.get('general.architecture')
    if field is None:
        raise CheckpointError(path, "has no 'general.architecture' field")
    return bytes(field.parts[field.data[0]]).decode()


def _head_dim(path: str, reader, arch: str) -> int | None:
    """``{arch}.attention.key_length``, which llama.cpp writes when config.json gives a head_dim
    (None when the file has none); CheckpointError when it is not a positive integer or
    ``value_length`` differs from it."""
    lengths = {}
    for kind in ('key', 'value'):
        field = reader.fields.get(f'{arch}.attention.{kind}_length')
        if field is not None:
            value = field.contents()
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(path, f"field '{arch}.attention.{kind}_length' must be a positive "
                                            f'integer, got {value!r}')
            lengths[kind] = value
    if 'key' not in lengths:
        return None
    if lengths.get('value', lengths['key']) != lengths['key']:
        raise CheckpointError(path, f"field '{arch}.attention.value_length' ({lengths['value']}) differs from "
                                    f"'{arch}.attention.key_length' ({lengths['key']}), which no supported "
                                    'model has')
    return lengths['key']


def _apply_metadata(path: str, reader, arch: str, config) -> None:
    """Set on the transformers ``config`` read from the file what its metadata gives and transformers'
    GGUF table does not read for every architecture: ``head_dim`` from ``attention.key_length`` (Qwen3's
    is not hidden_size / heads), and the rope scaling (``gguf_rope.py``). CheckpointError naming the
    file and the field or tensor when one cannot be read as a supported model's."""
    head_dim = _head_dim(path, reader, arch)
    if head_dim is not None:
        config.head_dim = head_dim
    rotary_dim = getattr(config, 'head_dim', None) or config.hidden_size // config.num_attention_heads
    rope_parameters = config.rope_parameters or {}
    rope = gguf_rope_parameters(path, reader, arch, rope_parameters.get('rope_theta', 10000.0), rotary_dim)
    if rope is not None:
        config.rope_parameters = {**rope_parameters, **rope}


def _convert(path: str, out_dir: str) -> None:
    try:
        import torch  # noqa: F401 - transformers' GGUF reader needs it
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError(f'loading a GGUF file needs the gguf and torch packages ({e}); '
                          "install them with: pip install 'lmdeploy_jax[gguf]'") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    reader = read_gguf(path)
    arch = _architecture(path, reader)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(f'GGUF file {path!r} has architecture {arch!r}, which is not supported '
                         f'(supported: {", ".join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})')
    folder, name = os.path.split(os.path.abspath(path))
    logger.warning('dequantizing GGUF %s into %s (once; later starts use the cache)', path, out_dir)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    _apply_metadata(path, reader, arch, config)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype='float32')
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop('lm_head.weight', None)
    from safetensors.torch import save_file
    save_file(state, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
    model.config.architectures = [type(model).__name__]
    model.config.to_json_file(os.path.join(out_dir, 'config.json'))
    model.generation_config.to_json_file(os.path.join(out_dir, 'generation_config.json'))
    tokenizer.save_pretrained(out_dir)


def gguf_to_hf_dir(path: str) -> str:
    """The cached HF directory of a GGUF file, converting it on first use (and then removing the
    conversions of the file's earlier versions)."""
    out_dir = conversion_cache.conversion_dir(path)
    if os.path.exists(os.path.join(out_dir, 'config.json')):
        return out_dir
    work = conversion_cache.work_dir(path)
    try:
        _convert(path, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    conversion_cache.publish(work, out_dir)
    conversion_cache.remove_replaced(path)
    return out_dir
