"""A GGUF file's rope scaling, as the ``rope_parameters`` of a transformers config.

llama.cpp's ``convert_hf_to_gguf.py`` writes a checkpoint's rope scaling in one of two ways, and
transformers' GGUF loader reads neither for Llama, Qwen2 or Qwen3, so without this a converted
model would run unscaled rope, silently:

- ``{arch}.rope.scaling.type`` ``linear`` or ``yarn`` with ``rope.scaling.factor``, and for yarn
  ``rope.scaling.original_context_length`` and the optional ``rope.scaling.yarn_*`` fields;
- Llama 3's ``llama3`` rope as the tensor ``rope_freqs.weight``: one factor per rotary frequency
  pair that the frequency is divided by (``LlamaModel.generate_extra_tensors``). Its four
  parameters are fitted back from the factors, and the fit must give the factors again.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import CheckpointError

ROPE_FREQS = 'rope_freqs.weight'
LLAMA3_CONTEXT = 8192       # original_max_position_embeddings of the fitted llama3 rope: any value gives the same rope
FIT_RTOL = 1e-5


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _scaling_fields(path: str, reader, arch: str) -> dict | None:
    """``rope.scaling.*`` as transformers' rope_parameters (None when the file scales nothing)."""
    prefix = f'{arch}.rope.scaling.'
    kind = _field(reader, prefix + 'type')
    if kind in (None, 'none'):
        return None
    factor = _field(reader, prefix + 'factor')
    if kind not in ('linear', 'yarn'):
        raise CheckpointError(path, f"field '{prefix}type' is {kind!r}; the rope scalings a GGUF file may give "
                                    "are 'linear' and 'yarn'")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise CheckpointError(path, f"field '{prefix}factor' must be a positive number, got {factor!r}")
    params = {'rope_type': kind, 'factor': float(factor)}
    if kind == 'yarn':
        original = _field(reader, prefix + 'original_context_length')
        if not isinstance(original, int) or original <= 0:
            raise CheckpointError(path, f"field '{prefix}original_context_length' must be a positive integer, "
                                        f'got {original!r}')
        params['original_max_position_embeddings'] = original
        extrapolation = _field(reader, prefix + 'yarn_ext_factor')
        if extrapolation not in (None, 1.0):
            raise CheckpointError(path, f"field '{prefix}yarn_ext_factor' is {extrapolation}; transformers' yarn "
                                        'rope extrapolates by 1.0 only')
        for gguf_name, name in (('yarn_attn_factor', 'attention_factor'), ('yarn_beta_fast', 'beta_fast'),
                                ('yarn_beta_slow', 'beta_slow')):
            if (value := _field(reader, prefix + gguf_name)) is not None:
                params[name] = float(value)
    return params


def llama3_factors(params: dict, rope_theta: float, rotary_dim: int) -> np.ndarray:
    """The factor each rotary frequency is divided by under llama3 rope ``params`` (transformers'
    ``_compute_llama3_parameters``, llama.cpp's ``rope_freqs``), float64 of shape (rotary_dim / 2,)."""
    freqs = 1.0 / rope_theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    wavelen = 2 * math.pi / freqs
    factor, context = params['factor'], params['original_max_position_embeddings']
    low, high = params['low_freq_factor'], params['high_freq_factor']
    smooth = (context / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, factor, medium))


def _fit_llama3(path: str, factors: np.ndarray, rope_theta: float, rotary_dim: int) -> dict | None:
    """llama3 rope parameters that give ``factors``; None when all are 1, linear when all are equal."""
    factor = float(factors.max())
    if np.allclose(factors, 1.0, rtol=FIT_RTOL, atol=0):
        return None
    if np.allclose(factors, factor, rtol=FIT_RTOL, atol=0):
        return {'rope_type': 'linear', 'factor': factor}
    inv_wavelen = 1.0 / rope_theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim) / (2 * math.pi)
    # llama3's smoothing s = (context / wavelen - low) / (high - low) is a line in 1 / wavelen;
    # the medium frequencies give its points, the last unscaled one (s >= 1) and first fully scaled one
    # (s <= 0) bound it
    unscaled = np.isclose(factors, 1.0, rtol=FIT_RTOL, atol=0)
    scaled = np.isclose(factors, factor, rtol=FIT_RTOL, atol=0)
    medium = ~unscaled & ~scaled
    points = [(x, (1 / f - 1 / factor) / (1 - 1 / factor)) for x, f in zip(inv_wavelen[medium], factors[medium])]
    if len(points) < 2 and unscaled.any():
        points.append((inv_wavelen[unscaled].min(), 1.0))
    if len(points) < 2 and scaled.any():
        points.append((inv_wavelen[scaled].max(), 0.0))
    params = None
    if len(points) >= 2:
        x, s = np.array(points).T
        slope, intercept = np.polyfit(x, s, 1)
        if slope > 0:
            span = LLAMA3_CONTEXT / slope          # high - low
            params = {'rope_type': 'llama3', 'factor': factor, 'original_max_position_embeddings': LLAMA3_CONTEXT,
                      'low_freq_factor': float(-intercept * span), 'high_freq_factor': float((1 - intercept) * span)}
    if params is None or not np.allclose(llama3_factors(params, rope_theta, rotary_dim), factors, rtol=1e-4):
        raise CheckpointError(path, f"tensor {ROPE_FREQS!r} does not hold llama3 rope factors (the only rope "
                                    'given by a tensor that is supported)')
    return params


def gguf_rope_parameters(path: str, reader, arch: str, rope_theta: float, rotary_dim: int) -> dict | None:
    """The rope scaling the GGUF file gives, as rope_parameters entries to merge into the config's
    (None when it gives none). CheckpointError naming the file and the field or tensor when the
    scaling is of a kind not supported, or its values are not numbers of the right sign."""
    params = _scaling_fields(path, reader, arch)
    tensor = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if tensor is None:
        return params
    if params is not None:
        raise CheckpointError(path, f"gives both the field '{arch}.rope.scaling.type' and the tensor {ROPE_FREQS!r}")
    from gguf import dequantize
    factors = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).reshape(-1)
    if factors.shape != (rotary_dim // 2,) or not (factors > 0).all():
        raise CheckpointError(path, f'tensor {ROPE_FREQS!r} must hold {rotary_dim // 2} positive factors (one per '
                                    f'rotary frequency), got shape {tuple(factors.shape)}')
    return _fit_llama3(path, factors, rope_theta, rotary_dim)
