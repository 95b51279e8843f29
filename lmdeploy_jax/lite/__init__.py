"""LMDeploy's ``lite`` toolkit on JAX: ``auto_awq`` quantizes a Hugging Face Llama-family model's
linear weights to 4 bits with activation-aware scales and writes a standard AWQ checkpoint."""
from .auto_awq import auto_awq

__all__ = ['auto_awq']
