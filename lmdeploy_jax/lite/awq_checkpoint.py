"""Writing a standard AutoAWQ (GEMM) checkpoint: ``config.json`` with ``quantization_config``
(``quant_method`` awq, ``version`` gemm, ``bits``, ``group_size``, ``zero_point`` true), safetensors
with each quantized linear as ``<name>.qweight``/``.qzeros``/``.scales`` (packed by
``checkpoint.awq_packing``) and every other tensor in the output dtype, sharded as Hugging Face
shards (``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``; one file is
``model.safetensors``), beside the source's tokenizer and generation files."""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from ..checkpoint.awq_packing import pack_awq
from ..checkpoint.engine_checkpoint import copy_model_files
from ..models.safetensors_file import INDEX_FILE

SHARD_BYTES = 4 << 30
SINGLE_FILE = 'model.safetensors'


def quantization_config(bits: int, group_size: int) -> dict:
    return {'quant_method': 'awq', 'version': 'gemm', 'bits': bits, 'group_size': group_size, 'zero_point': True}


class AwqCheckpointWriter:
    """Collects tensors and writes them in shards of about ``shard_bytes`` as they fill, so a
    model is never held whole; ``finish`` names the shards and writes the index."""

    def __init__(self, dst: str, dtype: np.dtype, shard_bytes: int = SHARD_BYTES):
        self.dst, self.dtype, self.shard_bytes = dst, np.dtype(dtype), shard_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._shards: list[list[str]] = []       # the tensor names of each written shard
        self._pending_bytes = 0
        self._total = 0

    def add(self, name: str, value: np.ndarray) -> None:
        """A float tensor, written in the checkpoint's dtype."""
        self._put(name, np.asarray(value).astype(self.dtype))

    def add_quantized(self, prefix: str, codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray) -> None:
        """The linear ``prefix`` (e.g. ``model.layers.0.self_attn.q_proj``) from codes ``[out, in]``
        and zeros, scales ``[out, in // group]`` (Hugging Face orientation), as AutoAWQ's
        ``qweight``, ``qzeros`` and float16 ``scales``."""
        qweight, qzeros, packed_scales = pack_awq(np.asarray(codes, np.uint8).T, np.asarray(zeros, np.uint8).T,
                                                  np.asarray(scales).T)
        for suffix, value in (('qweight', qweight), ('qzeros', qzeros), ('scales', packed_scales)):
            self._put(f'{prefix}.{suffix}', np.ascontiguousarray(value))

    def _put(self, name: str, value: np.ndarray) -> None:
        self._pending[name] = value
        self._pending_bytes += value.nbytes
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        save_file(self._pending, os.path.join(self.dst, _temporary_name(len(self._shards))), metadata={'format': 'pt'})
        self._total += self._pending_bytes
        self._shards.append(sorted(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is pending, give the shards their final names, write the index when there
        are several; the weight files' names."""
        self._flush()
        count = len(self._shards)
        names = [SINGLE_FILE] if count == 1 else [f'model-{k + 1:05d}-of-{count:05d}.safetensors' for k in range(count)]
        for k, name in enumerate(names):
            os.replace(os.path.join(self.dst, _temporary_name(k)), os.path.join(self.dst, name))
        if count > 1:
            weight_map = {tensor: name for name, tensors in zip(names, self._shards) for tensor in tensors}
            _write_json(os.path.join(self.dst, INDEX_FILE), {'metadata': {'total_size': self._total},
                                                             'weight_map': weight_map})
        return names


def write_model_files(hf_dir: str, dst: str, config: dict, dtype_name: str, bits: int, group_size: int) -> None:
    """Copy the source's non-weight files (tokenizer, generation config, chat template) into
    ``dst`` and write its ``config.json``: ``config`` with the AWQ ``quantization_config`` and
    the dtype of the unquantized tensors (``dtype``, and ``torch_dtype`` that older loaders read)."""
    copy_model_files(hf_dir, dst)
    config = {**config, 'quantization_config': quantization_config(bits, group_size), 'dtype': dtype_name,
              'torch_dtype': dtype_name}
    _write_json(os.path.join(dst, 'config.json'), config)


def _temporary_name(index: int) -> str:
    return f'.shard-{index:05d}.safetensors.partial'


def _write_json(path: str, value: dict) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(value, f, indent=2)
        f.write('\n')
