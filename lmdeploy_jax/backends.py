"""Choose and build the backend behind an AsyncEngine, as LMDeploy does.

``turbomind`` is the JAX engine; an architecture it does not support falls back to the
``pytorch`` reference backend with a warning naming the architecture (LMDeploy's behaviour).
"""
from __future__ import annotations

import dataclasses
import logging

from .checkpoint.quantization import check_model_format, check_not_quantized
from .checkpoint.source import ModelSource
from .engine_api import InferenceEngine
from .messages import PytorchEngineConfig, TurbomindEngineConfig

logger = logging.getLogger('lmdeploy_jax')

BACKENDS = ('turbomind', 'pytorch')
# turbomind-only settings that change only placement, scheduling or start-up, never the outputs
_PLACEMENT_AND_SCHEDULING = ('communicator', 'compilation_cache_dir', 'devices', 'enable_mixed_chunk', 'ep',
                             'max_prefill_token_num', 'num_cache_blocks')
_TURBOMIND_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TurbomindEngineConfig)}


def _convert_config(config, target_cls):
    """Carry the fields two engine configs share (a user may pass either kind to either backend)."""
    if config is None:
        return target_cls()
    if isinstance(config, target_cls):
        return config
    shared = {f.name for f in dataclasses.fields(target_cls)} & {f.name for f in dataclasses.fields(config)}
    values = {name: getattr(config, name) for name in shared}
    if isinstance(config, PytorchEngineConfig):
        values['cache_block_seq_len'] = config.block_size
    elif isinstance(config, TurbomindEngineConfig):
        if config.rope_scaling_factor:     # it changes the outputs: refused, not dropped
            raise ValueError(f'rope_scaling_factor={config.rope_scaling_factor} cannot be applied by the pytorch '
                             "backend, which runs the checkpoint's own rope (set rope_scaling in its config.json)")
        if config.model_format not in (None, 'hf'):     # the torch model loads float weights only
            raise ValueError(f'model_format={config.model_format!r} (4-bit weights) is loaded by the turbomind '
                             "backend only; the pytorch backend takes model_format None or 'hf'")
        if config.quant_policy:     # the torch model keeps its KV cache unquantized
            raise ValueError(f'quant_policy={config.quant_policy} (KV cache quantization) is applied by the turbomind '
                             'backend only; the pytorch backend supports quant_policy=0')
        if config.nnodes > 1 or config.dist_init_addr is not None:
            raise ValueError(f'nnodes={config.nnodes}, dist_init_addr={config.dist_init_addr!r}: the pytorch '
                             'backend runs in one process')
        dropped = [f'{name}={getattr(config, name)!r}' for name in _PLACEMENT_AND_SCHEDULING
                   if getattr(config, name) != _TURBOMIND_DEFAULTS[name]]
        if dropped:     # they change where and how fast, not what comes out: warned, not refused
            logger.warning('the pytorch backend ignores %s (settings of the turbomind engine)', ', '.join(dropped))
        values['block_size'] = config.cache_block_seq_len
    return target_cls(**values)


def _jax_engine_or_none(source: ModelSource, config: TurbomindEngineConfig) -> InferenceEngine | None:
    """The JAX engine, or None (with one warning naming the reason) when it cannot run the
    checkpoint: its architecture, or a feature of its config (a rope type), has no JAX model."""
    from .models import UnsupportedArchitectureError, is_supported
    if not is_supported(source.architecture):
        logger.warning('the turbomind (JAX) engine does not support architecture %s; falling back to '
                       "the pytorch reference backend", source.architecture)
        return None
    from .engine import JaxEngine
    try:
        return JaxEngine(source, config)
    except UnsupportedArchitectureError as e:     # a feature of its config, e.g. a rope type
        logger.warning('%s; falling back to the pytorch reference backend', e)
        return None


def check_supported(source: ModelSource) -> None:
    """Fail early, before any weight or the tokenizer is read, when no backend can run the model:
    UnsupportedQuantizationError naming the method when config.json's ``quantization_config`` is
    one the JAX engine does not load (whichever backend was asked for: the fallback would fail
    too) or a 4-bit mixture of experts, or the architecture of a 4-bit AWQ/GPTQ one has no JAX
    model; CheckpointError naming the file and the fault when its files are broken (invalid JSON,
    a missing or bad config field, a truncated or corrupt safetensors file, a tensor missing or of
    another shape than the config implies, no tokenizer); ValueError naming the architecture when
    neither engine knows it. The tensors are checked against the config where the JAX engine
    knows the architecture. transformers' model table (whose import pulls in torch, seconds of
    start-up) is read only for architectures the JAX engine lacks."""
    from .models import UnsupportedArchitectureError, is_supported
    from .models.loader import check_checkpoint
    from .models.registry import checkpoint_quantization
    from .models.safetensors_file import check_files
    from .tokenizer import check_tokenizer_files
    architecture = source.architecture
    quantized = checkpoint_quantization(architecture, source.config_path, source.config_dict()) is not None
    if quantized and not is_supported(architecture):
        check_not_quantized(source.config_path, source.config_dict())
    try:     # the JAX engine's checks; a feature of the config it lacks (a rope type) leaves it to transformers
        if not is_supported(architecture):
            raise UnsupportedArchitectureError(architecture)
        check_checkpoint(source)
    except UnsupportedArchitectureError:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if architecture not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
            raise ValueError(f'architecture {architecture!r} is not supported: neither the JAX engine nor '
                             'transformers (the pytorch backend) can run it as a causal language model')
        check_files(source.hf_dir)
    check_tokenizer_files(source.hf_dir)


def create_backend(source: ModelSource, backend: str,
                   backend_config: TurbomindEngineConfig | PytorchEngineConfig | None) -> InferenceEngine:
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    if backend == 'turbomind':
        config = _convert_config(backend_config, TurbomindEngineConfig)
        check_model_format(config.model_format, source.config_path, source.config_dict())
        engine = _jax_engine_or_none(source, config)
        if engine is not None:
            return engine
    check_not_quantized(source.config_path, source.config_dict())      # the pytorch backend loads none
    if source.is_engine_checkpoint:
        raise ValueError(f'{source.given} is an engine checkpoint (written by `lmdeploy_jax convert`), which only the '
                         'turbomind backend loads; for the pytorch backend, convert it back with '
                         '`lmdeploy_jax convert ... --dst-format hf`')
    from .pytorch.engine import PytorchEngine
    return PytorchEngine(source, _convert_config(backend_config, PytorchEngineConfig))
