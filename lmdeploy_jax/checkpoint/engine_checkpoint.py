"""The engine checkpoint directory that ``lmdeploy_jax convert`` writes: the model's parameters
already in the JAX engine's layout (fused projections, the target dtype, rows permuted and norms
offset as the family's weight map says) saved with Orbax, beside the Hugging Face files that
describe the model (config.json, generation_config.json, the tokenizer files)::

    engine_checkpoint.json    {"format": ..., "version": 1, "architecture": ..., "dtype": ...,
                               "biases": [...], "source": ...}
    params/                   Orbax checkpoint of the ``nnx`` state as a pure dict, laid out for tp=1
    config.json, tokenizer.json, ...

The parameters are stored as one device holds them (``FusedLayout`` at tp=1, each KV head once);
``models/restore.py`` lays them out for any tensor-parallel size while restoring.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from .errors import CheckpointError, read_json_object

METADATA_FILE = 'engine_checkpoint.json'
PARAMS_DIR = 'params'
FORMAT = 'lmdeploy_jax-engine-checkpoint'
VERSION = 1
# files of a Hugging Face directory that hold weights (the engine checkpoint holds them in params/)
_WEIGHT_SUFFIXES = ('.safetensors', '.safetensors.index.json', '.bin', '.bin.index.json', '.pt', '.pth', '.gguf')


def new_directory(dst_path: str) -> str:
    """``dst_path`` made absolute, after checking it is a directory to write into: absent or empty
    (ValueError naming it otherwise)."""
    dst = os.path.abspath(os.path.expanduser(dst_path))
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ValueError(f'--dst-path {dst_path!r} exists and is not an empty directory')
    return dst


def is_engine_checkpoint(path: str) -> bool:
    """Whether the directory ``path`` is an engine checkpoint (it has ``engine_checkpoint.json``)."""
    return os.path.isfile(os.path.join(path, METADATA_FILE))


@dataclass(frozen=True)
class EngineCheckpointInfo:
    """``engine_checkpoint.json``: the architecture the parameters were laid out for, their dtype
    name ('float32', 'bfloat16', 'float16'), the linears that have a bias (``ModelSpec.biases``),
    and what the checkpoint was converted from (for messages)."""
    architecture: str
    dtype: str
    biases: frozenset[str]
    source: str

    def write(self, path: str) -> None:
        with open(os.path.join(path, METADATA_FILE), 'w', encoding='utf-8') as f:
            json.dump({'format': FORMAT, 'version': VERSION, 'architecture': self.architecture, 'dtype': self.dtype,
                       'biases': sorted(self.biases), 'source': self.source}, f, indent=2)
            f.write('\n')


def read_info(path: str, config_architecture: str) -> EngineCheckpointInfo:
    """The metadata of the engine checkpoint directory ``path``; CheckpointError naming
    ``engine_checkpoint.json`` when it is not this format and version, a field is missing or of the
    wrong type, or its architecture is not config.json's ``config_architecture``; naming ``params``
    when the Orbax directory is missing."""
    file = os.path.join(path, METADATA_FILE)
    meta = read_json_object(file)
    if meta.get('format') != FORMAT or meta.get('version') != VERSION:
        raise CheckpointError(file, f"is not a {FORMAT} of version {VERSION} (format {meta.get('format')!r}, "
                                    f"version {meta.get('version')!r}); convert the model again")
    for key, kind in (('architecture', str), ('dtype', str), ('biases', list), ('source', str)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(file, f'field {key!r} must be a {kind.__name__}, got {meta.get(key)!r}')
    if meta['architecture'] != config_architecture:
        raise CheckpointError(file, f"architecture {meta['architecture']!r} is not config.json's "
                                    f'{config_architecture!r}')
    if not os.path.isdir(os.path.join(path, PARAMS_DIR)):
        raise CheckpointError(os.path.join(path, PARAMS_DIR), 'the Orbax parameter directory is missing')
    return EngineCheckpointInfo(meta['architecture'], meta['dtype'], frozenset(meta['biases']), meta['source'])


def copy_model_files(hf_dir: str, dst: str) -> list[str]:
    """Copy every file of ``hf_dir`` but the weights and an engine checkpoint's metadata (config,
    generation config, tokenizer, chat template, ...) into ``dst``; the names copied."""
    names = sorted(n for n in os.listdir(hf_dir) if os.path.isfile(os.path.join(hf_dir, n))
                   and not n.endswith(_WEIGHT_SUFFIXES) and n != METADATA_FILE)
    for name in names:
        shutil.copyfile(os.path.join(hf_dir, name), os.path.join(dst, name))
    return names
