"""Every tensor of a Hugging Face ``*.safetensors`` directory as a read-only numpy view of the
memory-mapped files: a slice of a weight costs one copy (into the array it is placed in), and the
rest of the file is never read.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
offsets after the header), then the raw row-major data.
"""
from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {'F32': np.dtype(np.float32), 'BF16': np.dtype(ml_dtypes.bfloat16), 'F16': np.dtype(np.float16)}
_DTYPE_NAMES = {'F32': 'float32', 'BF16': 'bfloat16', 'F16': 'float16'}


class SafetensorsCheckpoint:
    """The tensors of a directory's ``*.safetensors`` files, by name; a context manager. Leaving
    it drops the maps, which close once no array uses them (on a CPU, JAX may keep a weight as a
    view of the file instead of copying it)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self.files = sorted(glob.glob(os.path.join(hf_dir, '*.safetensors')))
        if not self.files:
            raise FileNotFoundError(f'no *.safetensors weights in {hf_dir!r}')
        self._maps: list[np.memmap] = []
        self._where: dict[str, tuple[int, dict, int]] = {}     # name -> (map index, header entry, data start)

    def __enter__(self) -> 'SafetensorsCheckpoint':
        for path in self.files:
            with open(path, 'rb') as f:
                (length,) = struct.unpack('<Q', f.read(8))
                header = json.loads(f.read(length))
            header.pop('__metadata__', None)
            self._maps.append(np.memmap(path, np.uint8, mode='r'))
            for name, entry in header.items():
                self._where[name] = (len(self._maps) - 1, entry, 8 + length)
        return self

    def __exit__(self, *exc) -> None:
        self._maps.clear()
        self._where.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _entry(self, name: str) -> tuple[int, dict, int]:
        if name not in self._where:
            raise KeyError(f'tensor {name!r} is missing from the checkpoint in {self.hf_dir!r}')
        return self._where[name]

    def dtype_name(self, name: str) -> str:
        """The stored dtype of ``name`` as 'float32' | 'bfloat16' | 'float16'."""
        stored = self._entry(name)[1]['dtype']
        if stored not in _DTYPE_NAMES:
            raise ValueError(f'tensor {name!r} is stored as {stored}; expected one of {sorted(_DTYPE_NAMES)}')
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
