"""``pipeline()``: LMDeploy's entry point."""
from __future__ import annotations

import logging

from .messages import PytorchEngineConfig, TurbomindEngineConfig

_LOG_LEVELS = ('CRITICAL', 'FATAL', 'ERROR', 'WARN', 'WARNING', 'INFO', 'DEBUG', 'NOTSET')


def set_log_level(log_level: str) -> None:
    if not isinstance(log_level, str) or log_level.upper() not in _LOG_LEVELS:
        raise ValueError(f'log_level must be one of {_LOG_LEVELS}, got {log_level!r}')
    logger = logging.getLogger('lmdeploy_jax')
    logger.setLevel(log_level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter('%(asctime)s - lmdeploy_jax - %(levelname)s - %(message)s'))
        logger.addHandler(handler)


def pipeline(model_path: str | None = None, model_name: str | None = None, backend: str = 'turbomind',
             backend_config: TurbomindEngineConfig | PytorchEngineConfig | None = None,
             chat_template_config=None, instance_num: int = 32, tp: int = 1, log_level: str = 'ERROR',
             max_log_len: int | None = None, trust_remote_code: bool = False, speculative_config=None,
             allowed_media_domains: list[str] | None = None, **kwargs):
    """Build an ``AsyncEngine`` for ``model_path`` (None: the embedded SmolLM2-135M-Instruct).

    ``tp`` fills the backend config's ``tp`` when it leaves it at 1. ``instance_num`` is
    accepted for LMDeploy compatibility and validated; concurrency is the backend's
    ``max_batch_size`` (default: by platform). ``trust_remote_code`` (False, LMDeploy's default)
    lets the tokenizer run the model repository's code; ``max_log_len`` is validated (prompts are
    never logged). ``speculative_config`` and ``allowed_media_domains`` other than None raise
    ``ValueError`` (no speculative decoding, no media inputs); any other keyword raises ``TypeError``.
    """
    from .serve.async_engine import AsyncEngine
    from .serve.unsupported import refuse_pipeline_arguments, refuse_unknown_keywords
    refuse_unknown_keywords('pipeline', kwargs)
    refuse_pipeline_arguments(speculative_config, allowed_media_domains, max_log_len, trust_remote_code)
    set_log_level(log_level)
    if not isinstance(instance_num, int) or isinstance(instance_num, bool) or instance_num < 1:
        raise ValueError(f'instance_num must be an integer >= 1, got {instance_num!r}')
    if not isinstance(backend_config, (TurbomindEngineConfig, PytorchEngineConfig, type(None))):
        raise ValueError('backend_config must be a TurbomindEngineConfig, a PytorchEngineConfig or None, got '
                         f'{type(backend_config).__name__}')
    if backend_config is None:
        backend_config = (PytorchEngineConfig if backend == 'pytorch' else TurbomindEngineConfig)(tp=tp)
    elif tp != 1 and backend_config.tp == 1:
        backend_config = type(backend_config)(**{**backend_config.__dict__, 'tp': tp})
    return AsyncEngine(model_path, model_name=model_name, backend=backend, backend_config=backend_config,
                       chat_template_config=chat_template_config, trust_remote_code=trust_remote_code)
