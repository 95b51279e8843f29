"""Activation-aware weight quantization (AWQ) maths, in JAX: group-wise asymmetric quantization,
the smoothing scales of a group of linears that share an input, and the grid search of the
scales' ratio that minimises a block's output error (AutoAWQ's ``_search_best_scale``, LMDeploy's
``auto_scale_block``).

Weights are Hugging Face ``nn.Linear`` matrices ``[out, in]``; a quantization group is
``group_size`` consecutive input channels of one output row; the smoothing scales ``s [in]``
multiply a linear's input channels (``W * s``) while the operation before it divides its output
by ``s``, so the float block is unchanged and the quantization grid follows the activations.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

GRID = 20                  # ratios 0, 1/20, ..., 19/20, as AutoAWQ and LMDeploy search
DEFAULT_RATIO = 0.5        # LMDeploy's smoothing ratio when the search is off
_TINY = 1e-4


def group_scales_zeros(w: jax.Array, bits: int, group_size: int, scale_dtype=jnp.float32
                       ) -> tuple[jax.Array, jax.Array]:
    """float32 ``scales`` and ``zeros`` ``[out, in // group_size]`` of asymmetric quantization of
    ``w [out, in]``: ``scale = max(max - min, 1e-5) / (2**bits - 1)`` rounded to ``scale_dtype`` (the
    dtype the checkpoint stores, so codes are computed against the stored scale), ``zero =
    clip(-round(min / scale), 0, 2**bits - 1)``, as LMDeploy's ``pseudo_quantize_tensor``."""
    groups = _grouped(w, group_size)
    qmax = 2 ** bits - 1
    lo, hi = groups.min(-1), groups.max(-1)
    scales = (jnp.maximum(hi - lo, 1e-5) / qmax).astype(scale_dtype).astype(jnp.float32)
    zeros = jnp.clip(-jnp.round(lo / scales), 0, qmax)
    return scales, zeros


def quantize(w: jax.Array, bits: int, group_size: int, scale_dtype=jnp.float32
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(codes, scales, zeros)`` of ``w [out, in]``: int32 codes ``[out, in]`` in
    ``[0, 2**bits)``, scales and zeros as ``group_scales_zeros``; ``dequantize`` inverts it."""
    scales, zeros = group_scales_zeros(w, bits, group_size, scale_dtype)
    codes = jnp.clip(jnp.round(_grouped(w, group_size) / scales[..., None]) + zeros[..., None], 0, 2 ** bits - 1)
    return codes.reshape(w.shape).astype(jnp.int32), scales, zeros


def dequantize(codes: jax.Array, scales: jax.Array, zeros: jax.Array) -> jax.Array:
    """float32 ``[out, in]``: ``(codes - zero) * scale`` of each group."""
    group_size = codes.shape[1] // scales.shape[1]
    groups = _grouped(codes.astype(jnp.float32), group_size)
    return ((groups - zeros[..., None]) * scales[..., None]).reshape(codes.shape)


def pseudo_quantize(w: jax.Array, bits: int, group_size: int) -> jax.Array:
    """``w`` rounded to its group-wise quantization grid (float32, ``w``'s shape)."""
    return dequantize(*quantize(w, bits, group_size))


def weight_mean(weights: Sequence[jax.Array], group_size: int) -> jax.Array:
    """float32 ``[in]``: the mean over output rows of ``|w| / max |w| of its group``, the linears
    sharing the input stacked (LMDeploy's ``get_weight_scale``)."""
    w = jnp.concatenate([jnp.asarray(x, jnp.float32) for x in weights], axis=0)
    groups = jnp.abs(_grouped(w, group_size))
    relative = groups / jnp.maximum(groups.max(-1, keepdims=True), _TINY)
    return relative.reshape(w.shape).mean(0)


def smoothing_scales(activation: jax.Array, w_mean: jax.Array, ratio, keep: jax.Array | None = None) -> jax.Array:
    """float32 ``[in]``: ``activation**ratio / w_mean**(1 - ratio)`` (both ``[in]``, non-negative),
    clamped at 1e-4 and divided by ``sqrt(max * min)`` so they centre on 1. ``keep`` (bool
    ``[in]``): channels that must keep scale 1 (a norm weight of 0 there: nothing to smooth),
    left out of the centring."""
    scales = jnp.maximum(activation ** ratio / jnp.maximum(w_mean ** (1 - ratio), _TINY), _TINY)
    if keep is None:
        return scales / jnp.sqrt(scales.max() * scales.min())
    big, small = jnp.where(keep, 0.0, scales).max(), jnp.where(keep, jnp.inf, scales).min()
    return jnp.where(keep, 1.0, scales / jnp.sqrt(big * small))


Block = Callable[[list[jax.Array], object, jax.Array], jax.Array]


def ratio_losses(block: Block, weights: Sequence[jax.Array], params, x: jax.Array, activation: jax.Array,
                 w_mean: jax.Array, bits: int, group_size: int) -> jax.Array:
    """float32 ``[GRID]``: for each ratio ``r = i / GRID``, the summed squared error between
    ``block(weights, params, x)`` and ``block`` with each weight replaced by
    ``pseudo_quantize(w * s) / s``, ``s = smoothing_scales(activation, w_mean, r)``. ``block`` is
    the float computation reading the linears ``weights`` (in that order) and the other parameters
    ``params`` (any pytree, left float); ``x`` one batch of its input."""
    reference = block(list(weights), params, x).astype(jnp.float32)

    def loss(ratio):
        s = smoothing_scales(activation, w_mean, ratio)
        quantized = [pseudo_quantize(w * s, bits, group_size) / s for w in weights]
        return jnp.sum(jnp.square(block(quantized, params, x).astype(jnp.float32) - reference))

    return jax.lax.map(loss, jnp.arange(GRID, dtype=jnp.float32) / GRID)


class RatioSearch:
    """The grid search of one kind of block: ``search(weights, params, batches, activation)`` is the
    ratio of the grid (0, 1/GRID, ..., (GRID-1)/GRID) whose smoothing scales give the least output
    error of ``block`` (as in ``ratio_losses``) summed over ``batches`` (its inputs) when
    ``weights`` are quantized; ``activation [in]`` is the mean ``|x|`` per input channel of the
    linears. ``feed(params, x)``, when given, maps each batch to the block's input once, before
    the grid (e.g. down_proj's input from the normed MLP input, so that only hidden-wide
    activations need be kept). ``block`` and ``feed`` must be pure functions jit can trace; they
    are compiled once per shapes, so one RatioSearch serves every layer of a model, each layer's
    tensors passed in ``params``."""

    def __init__(self, block: Block, bits: int, group_size: int,
                 feed: Callable[[object, jax.Array], jax.Array] | None = None):
        self.group_size = group_size

        def losses(weights, params, x, activation, w_mean):
            x = feed(params, x) if feed is not None else x
            return ratio_losses(block, weights, params, x, activation, w_mean, bits, group_size)
        self._losses = jax.jit(losses)

    def __call__(self, weights: Sequence[jax.Array], params, batches: Sequence[jax.Array],
                 activation: jax.Array) -> float:
        w_mean = weight_mean(weights, self.group_size)
        total = sum(self._losses(list(weights), params, x, activation, w_mean) for x in batches)
        return float(jnp.argmin(total)) / GRID


def _grouped(w: jax.Array, group_size: int) -> jax.Array:
    """``w [out, in]`` as ``[out, in // group_size, group_size]``; ValueError unless the group
    size divides ``in``."""
    out, width = w.shape
    if width % group_size:
        raise ValueError(f'--w-group-size {group_size} does not divide the input width {width} of a linear')
    return w.reshape(out, width // group_size, group_size)
