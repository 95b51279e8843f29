"""The JAX engine's models: a multi-architecture package of ``flax.nnx`` decoders over a paged KV
cache. ``registry.py`` maps each Hugging Face architecture to its module under ``families/``; the
families compose the shared ``layers/``; ``loader.py`` loads a checkpoint by the family's weight map."""
from .kv_cache import init_kv_caches, kv_bytes_per_block, kv_cache_shape
from .loader import LoadedModel, load_model
from .registry import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, is_supported
from .spec import ModelSpec
from .step_batch import MixedBatch, StepBatch

__all__ = ['LoadedModel', 'MixedBatch', 'ModelSpec', 'StepBatch', 'SUPPORTED_ARCHITECTURES',
           'UnsupportedArchitectureError', 'init_kv_caches', 'is_supported', 'kv_bytes_per_block', 'kv_cache_shape',
           'load_model']
