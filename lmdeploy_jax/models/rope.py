"""Rotary position embeddings, as Hugging Face computes them: inverse frequencies once on the
host (with Llama 3.1 scaling when asked), cos/sin in float32 at the step's positions. The rotation
itself (``apply_rope``) lives with the kernels, whose decode-step op's reference uses it too."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.rope import apply_rope  # noqa: F401 - the models' rope, re-exported

from .spec import RopeSpec


def inv_frequencies(rope: RopeSpec, head_dim: int) -> np.ndarray:
    """float32 ``[head_dim // 2]``."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if rope.rope_type == 'llama3':
        inv_freq = _llama3_scale(inv_freq, rope)
    return inv_freq.astype(np.float32)


def _llama3_scale(inv_freq: np.ndarray, rope: RopeSpec) -> np.ndarray:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled)


def cos_sin(inv_freq: np.ndarray, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 ``[..., head_dim]`` tables for ``positions [...]`` (halves repeated, HF layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
