"""Rotary position embeddings as transformers computes them (``modeling_rope_utils``): the inverse
frequencies of each rope type on the host, in float32 in transformers' order of operations; cos and
sin in float32 at a step's positions, multiplied by the type's attention factor (yarn, longrope).
The rotation itself (``apply_rope``) lives with the kernels, whose decode-step op's reference uses it.

Types: default, linear, dynamic (NTK), yarn, llama3, longrope, each with partial rotary dims (the
first ``rotary_dim`` dims of a head rotate, rotate-half within them, the rest pass through).

Dynamic and longrope depend on the length of the sequence, and transformers reads it per forward
call: ``max(position_ids) + 1``. Dynamic raises the base once that length exceeds
``max_position_embeddings``; longrope takes the long factors once it exceeds
``original_max_position_embeddings``. The reference backend calls the model once for a prompt
(all its tokens) and once per generated token, so the token at position ``p`` of a request whose
prompt ends at ``P`` is rotated for the length ``max(P, p + 1)``. ``cos_sin`` reads each row's
length the same way, from the step's positions, so the engine rotates every token as the
reference does whenever each prompt (or turn) is prefilled in one chunk. The contract's
exceptions, where a row's length differs from the reference's call and the rotation of those
tokens differs (only when the lengths fall on different sides of the threshold, for longrope; for
any length above it, for dynamic):

- a prompt prefilled in several chunks (longer than the largest prefill bucket or
  ``max_prefill_token_num``, or cut to share a step): each chunk's tokens are rotated for the
  length at that chunk's end, not at the prompt's;
- prefix caching: blocks reused from an earlier request keep the rotation its chunk gave them;
- a sequence recomputed after preemption: its prompt and generated tokens are re-prefilled and
  rotated for the recompute chunk's end;
- ``get_ppl`` runs chunks of ``sequence_forward.PPL_MAX_CHUNK`` tokens where the reference runs the whole
  sequence in one call.

transformers' dynamic rope also keeps its grown frequencies from one call to the next until a call
shorter than ``max_position_embeddings`` resets them, so the reference's output for a request can
depend on the requests served before it or beside it (it steps them in turn through one model); the
engine computes every request as a freshly loaded transformers model serves it alone. The other
types' frequencies do not depend on the length, and the engine agrees with the reference however it
chunks. "Agrees" is up to float32 rounding: numpy's, XLA's and torch's ``pow`` may differ in the
last bit of a frequency.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.rope import apply_rope  # noqa: F401 - the models' rope, re-exported

from .spec import RopeSpec


def rotary_dim(rope: RopeSpec, head_dim: int) -> int:
    """How many leading dims of a head rotate (transformers' ``int(head_dim * partial_rotary_factor)``)."""
    return int(head_dim * rope.partial_rotary_factor)


def inv_frequencies(rope: RopeSpec, head_dim: int) -> np.ndarray:
    """float32 ``[rotary_dim // 2]``: the inverse frequencies transformers' rotary embedding holds
    after init. For longrope those of the short factors, for dynamic the unscaled ones (``cos_sin``
    switches to the long factors or the grown base per row)."""
    dim = rotary_dim(rope, head_dim)
    if rope.rope_type == 'longrope':
        return _longrope(rope.short_factor, rope, dim)
    powers = np.float32(rope.theta) ** _exponents(dim)
    inv_freq = (1.0 / powers).astype(np.float32)
    if rope.rope_type == 'linear':
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.rope_type == 'llama3':
        inv_freq = _llama3_scale(inv_freq, rope)
    elif rope.rope_type == 'yarn':
        inv_freq = _yarn_blend(powers, rope, dim)
    return inv_freq.astype(np.float32)


def _exponents(dim: int) -> np.ndarray:
    return np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)


def _longrope(factors: tuple[float, ...], rope: RopeSpec, dim: int) -> np.ndarray:
    """LongRoPE: each pair's frequency divided by its factor (short or long)."""
    if len(factors) != dim // 2:
        raise ValueError(f'rope_parameters: longrope needs {dim // 2} factors (one per rotated pair), '
                         f'got {len(factors)}')
    powers = np.float32(rope.theta) ** _exponents(dim)
    return (1.0 / (np.asarray(factors, np.float32) * powers)).astype(np.float32)


def _llama3_scale(inv_freq: np.ndarray, rope: RopeSpec) -> np.ndarray:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(rope.factor), inv_freq)
    smooth = (np.float32(old_len) / wavelen - np.float32(rope.low_freq_factor)) / np.float32(
        rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(rope.factor) + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn_blend(powers: np.ndarray, rope: RopeSpec, dim: int) -> np.ndarray:
    """YaRN: interpolated (divided by ``factor``) frequencies for the dims that turn fewer than
    ``beta_slow`` times over the original context, extrapolated (kept) ones for those that turn
    more than ``beta_fast`` times, a linear ramp between."""
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = np.float32(1) - ramp
    inv_extrapolation = np.float32(1.0) / powers
    inv_interpolation = np.float32(1.0) / (np.float32(rope.factor) * powers)
    return inv_interpolation * (1 - extrapolation) + inv_extrapolation * extrapolation


def _dynamic_inv_freq(rope: RopeSpec, dim: int, length: jax.Array) -> jax.Array:
    """Dynamic NTK's frequencies for sequences of ``length`` (int32 ``[...]``) tokens, float32
    ``[..., dim // 2]``: the base grown as transformers grows it above ``max_position_embeddings``."""
    length = jnp.maximum(length, rope.max_position_embeddings).astype(jnp.float32)
    grown = (jnp.float32(rope.factor) * length / jnp.float32(rope.max_position_embeddings)
             - jnp.float32(rope.factor - 1)) ** jnp.float32(dim / (dim - 2))
    base = jnp.float32(rope.theta) * grown
    return 1.0 / base[..., None] ** jnp.asarray(_exponents(dim))


def cos_sin(inv_freq: np.ndarray, positions: jax.Array,
            rope: RopeSpec = RopeSpec()) -> tuple[jax.Array, jax.Array]:
    """float32 cos and sin ``[..., rotary_dim]`` (halves repeated, HF layout) for int32
    ``positions [..., T]``, each row's last axis one sequence's tokens of this step; ``inv_freq``
    from ``inv_frequencies(rope, head_dim)``. For dynamic and longrope a row's frequencies follow
    its length, ``max(positions) + 1`` (the module docstring says how that meets the reference);
    yarn's and longrope's attention factor multiplies both tables."""
    table = jnp.asarray(inv_freq)
    if rope.rope_type in ('dynamic', 'longrope'):
        length = (jnp.max(positions, axis=-1, keepdims=True) + 1)[..., None]     # [..., 1, 1]
        if rope.rope_type == 'dynamic':
            grown = _dynamic_inv_freq(rope, 2 * table.shape[-1], length[..., 0])
            table = jnp.where(length > rope.max_position_embeddings, grown, table)
        else:
            long = jnp.asarray(_longrope(rope.long_factor, rope, 2 * table.shape[-1]))
            table = jnp.where(length > rope.original_max_position_embeddings, long, table)
    freqs = positions.astype(jnp.float32)[..., None] * table
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if rope.attention_factor != 1.0:
        cos, sin = cos * jnp.float32(rope.attention_factor), sin * jnp.float32(rope.attention_factor)
    return cos, sin
