"""Every tensor of a Hugging Face ``*.safetensors`` directory as a read-only numpy view of the
memory-mapped files: a slice of a weight costs one copy (into the array it is placed in), and the
rest of the file is never read.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
offsets after the header), then the raw row-major data.
"""
from __future__ import annotations

import glob
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from ..checkpoint.errors import CheckpointError, read_json_object

_DTYPES = {'F32': np.dtype(np.float32), 'BF16': np.dtype(ml_dtypes.bfloat16), 'F16': np.dtype(np.float16),
           'I32': np.dtype(np.int32)}       # int32: the packed codes of AWQ/GPTQ checkpoints
_DTYPE_NAMES = {'F32': 'float32', 'BF16': 'bfloat16', 'F16': 'float16', 'I32': 'int32'}
# bytes per element of the format's dtypes (others, e.g. sub-byte ones, are not size-checked)
_ITEM_BYTES = {'F64': 8, 'I64': 8, 'U64': 8, 'F32': 4, 'I32': 4, 'U32': 4, 'F16': 2, 'BF16': 2, 'I16': 2,
               'U16': 2, 'I8': 1, 'U8': 1, 'BOOL': 1, 'F8_E4M3': 1, 'F8_E5M2': 1, 'F8_E8M0': 1}


def read_header(path: str) -> tuple[dict, int]:
    """``(name -> {'dtype', 'shape', 'data_offsets'}, first data byte)`` of a safetensors file,
    metadata dropped. CheckpointError naming the file when it is truncated or its header is
    corrupt: not JSON, an entry without a dtype, shape or offsets, offsets that disagree with
    the shape, or data past the end of the file."""
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointError(path, f'is truncated: {size} bytes, shorter than the 8-byte header length')
    with open(path, 'rb') as f:
        (length,) = struct.unpack('<Q', f.read(8))
        if length > size - 8:
            raise CheckpointError(path, f'is truncated or corrupt: its header declares {length} bytes, '
                                        f'but the file holds {size} bytes in all')
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f'has a corrupt header (not JSON: {e})') from None
    if not isinstance(header, dict):
        raise CheckpointError(path, 'has a corrupt header (not a JSON object)')
    header.pop('__metadata__', None)
    data_start = 8 + length
    for name, entry in header.items():
        _check_entry(path, name, entry, size - data_start)
    return header, data_start


INDEX_FILE = 'model.safetensors.index.json'


def weight_files(hf_dir: str) -> list[str]:
    """The directory's ``*.safetensors`` files, sorted; CheckpointError naming the index file
    (``INDEX_FILE``, a sharded checkpoint's) when a shard it lists is missing."""
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index):
        weight_map = read_json_object(index).get('weight_map')
        if not isinstance(weight_map, dict):
            raise CheckpointError(index, "has no 'weight_map' object")
        missing = sorted({f for f in weight_map.values() if not os.path.exists(os.path.join(hf_dir, str(f)))})
        if missing:
            raise CheckpointError(index, f'lists shards that are missing: {", ".join(map(str, missing))}')
    return sorted(glob.glob(os.path.join(glob.escape(hf_dir), '*.safetensors')))


def check_files(hf_dir: str) -> None:
    """``read_header`` of every ``*.safetensors`` file in ``hf_dir`` (none is fine: the weights
    may be in another format), after ``weight_files``' check of the index: CheckpointError naming
    the first broken file."""
    for path in weight_files(hf_dir):
        read_header(path)


def _check_entry(path: str, name: str, entry, data_bytes: int) -> None:
    """Raise CheckpointError unless ``entry`` describes a tensor lying within ``data_bytes``."""
    try:
        dtype, shape, (begin, end) = entry['dtype'], entry['shape'], entry['data_offsets']
        valid = (isinstance(dtype, str) and all(isinstance(n, int) and n >= 0 for n in shape)
                 and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise CheckpointError(path, f'has a corrupt header entry for tensor {name!r}: {entry!r}')
    if dtype in _ITEM_BYTES and end - begin != math.prod(shape) * _ITEM_BYTES[dtype]:
        raise CheckpointError(path, f'has a corrupt header: tensor {name!r} ({dtype}, shape {tuple(shape)}) '
                                    f'is given {end - begin} bytes')
    if end > data_bytes:
        raise CheckpointError(path, f'is truncated: tensor {name!r} ends at data byte {end}, but the file '
                                    f'holds {data_bytes} bytes of data')


class SafetensorsCheckpoint:
    """The tensors of a directory's ``*.safetensors`` files, by name; a context manager. Leaving
    it drops the maps, which close once no array uses them (on a CPU, JAX may keep a weight as a
    view of the file instead of copying it)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self.files = weight_files(hf_dir)
        if not self.files:
            raise FileNotFoundError(f'no *.safetensors weights in {hf_dir!r}')
        self._maps: list[np.memmap] = []
        self._where: dict[str, tuple[int, dict, int]] = {}     # name -> (map index, header entry, data start)

    def __enter__(self) -> 'SafetensorsCheckpoint':
        for path in self.files:
            header, data_start = read_header(path)
            self._maps.append(np.memmap(path, np.uint8, mode='r'))
            for name, entry in header.items():
                self._where[name] = (len(self._maps) - 1, entry, data_start)
        return self

    def __exit__(self, *exc) -> None:
        self._maps.clear()
        self._where.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    @property
    def location(self) -> str:
        """The weights file, or the directory when the weights span several (for messages)."""
        return self.files[0] if len(self.files) == 1 else self.hf_dir

    def file_of(self, name: str) -> str:
        """The file holding tensor ``name``."""
        return self.files[self._entry(name)[0]]

    def _entry(self, name: str) -> tuple[int, dict, int]:
        if name not in self._where:
            raise CheckpointError(self.location, f'tensor {name!r} is missing')
        return self._where[name]

    def dtype_name(self, name: str) -> str:
        """The stored dtype of ``name`` as 'float32' | 'bfloat16' | 'float16'."""
        stored = self._entry(name)[1]['dtype']
        if stored not in _DTYPE_NAMES:
            raise CheckpointError(self.file_of(name), f'tensor {name!r} is stored as {stored}; the JAX engine '
                                                      f'loads {", ".join(sorted(_DTYPE_NAMES))}')
        return _DTYPE_NAMES[stored]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]['shape'])

    def view(self, name: str) -> np.ndarray:
        """The stored tensor, a read-only view of the mapped file (nothing is read until used)."""
        self.dtype_name(name)                       # raises for dtypes the engine cannot load
        index, entry, data_start = self._entry(name)
        dtype = _DTYPES[entry['dtype']]
        begin, end = entry['data_offsets']
        raw = self._maps[index][data_start + begin:data_start + end]
        return raw.view(dtype).reshape(entry['shape'])
