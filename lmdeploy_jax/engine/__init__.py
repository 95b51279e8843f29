"""The JAX engine (``backend='turbomind'``): paged KV cache, continuous batching, compiled steps."""
from .engine import JaxEngine

__all__ = ['JaxEngine']
