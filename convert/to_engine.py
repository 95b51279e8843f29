"""``convert``: a model -> an engine checkpoint directory (``checkpoint/engine_checkpoint.py``)."""
from __future__ import annotations

import os

import orbax.checkpoint as ocp
from flax import nnx

from lmdeploy_jax.checkpoint.engine_checkpoint import (PARAMS_DIR, EngineCheckpointInfo, copy_model_files,
                                                       new_directory)
from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.models import load_model


def convert(model_path: str, dst_path: str, dtype: str = 'auto') -> str:
    """Write the engine checkpoint of ``model_path`` (a Hugging Face directory, a ``.gguf`` file, a hub
    id, or an engine checkpoint) into the new or empty directory ``dst_path``: its parameters read by
    the family's weight map, cast to ``dtype`` ('auto': the checkpoint's; 'float32', 'bfloat16',
    'float16'), saved with Orbax, plus the model's config and tokenizer files. Returns ``dst_path``.
    Raises ValueError when ``dst_path`` holds files or ``dtype`` is not one of those,
    UnsupportedArchitectureError when the JAX engine has no model for the architecture,
    CheckpointError naming a broken file."""
    dst = new_directory(dst_path)
    source = resolve_model(model_path)
    model = load_model(source, dtype)          # on one device, as the engine lays it out at tp=1
    os.makedirs(dst, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(dst, PARAMS_DIR), nnx.to_pure_dict(model.params))
    copy_model_files(source.hf_dir, dst)
    EngineCheckpointInfo(model.spec.architecture, model.spec.dtype.name, model.spec.biases,
                         os.fspath(model_path)).write(dst)
    return dst_path
