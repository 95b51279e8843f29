"""Checkpoint conversion for the JAX engine (``lmdeploy_jax convert``): a Hugging Face safetensors
directory, a GGUF file or a hub id -> an engine checkpoint directory (Orbax parameters in the
engine's layout, ``lmdeploy_jax.checkpoint.engine_checkpoint``) that ``pipeline()`` and
``lmdeploy_jax.load_model()`` restore at any tensor-parallel size."""
from .to_engine import convert

__all__ = ['convert']
