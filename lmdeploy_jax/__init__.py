"""lmdeploy_jax: LMDeploy's pipeline, engine and server on JAX/XLA.

Names are imported lazily, so ``import lmdeploy_jax`` stays cheap (no jax, torch or transformers
until they are used).
"""
import importlib

__version__ = '0.1.0'

_EXPORTS = {
    'pipeline': '.api',
    'AsyncEngine': '.serve.async_engine',
    'GenerationConfig': '.messages',
    'TurbomindEngineConfig': '.messages',
    'PytorchEngineConfig': '.messages',
    'Response': '.messages',
    'ChatTemplateConfig': '.chat_template',
    'Tokenizer': '.tokenizer',
    'load_model': '.research',
}

__all__ = [*_EXPORTS, '__version__']


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
