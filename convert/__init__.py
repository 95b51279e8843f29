"""Checkpoint conversion for the JAX engine (``lmdeploy_jax convert``): a Hugging Face safetensors
directory, a GGUF file or a hub id -> an engine checkpoint directory (Orbax parameters in the
engine's layout, ``lmdeploy_jax.checkpoint.engine_checkpoint``) that ``pipeline()`` and
``lmdeploy_jax.load_model()`` restore at any tensor-parallel size; and back (``export_hf``), so
weights changed in JAX go to every other tool."""
from .to_engine import convert
from .to_hf import export_hf

__all__ = ['convert', 'export_hf']
