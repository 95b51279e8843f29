"""The quantized KV cache: its page layout, and the quantize/dequantize arithmetic every kernel and
reference uses (LMDeploy's ``quant_policy=8`` and ``4``).

Semantics (LMDeploy's): online, asymmetric, per token and per KV head. Each head row ``x`` of
``head_dim`` values of one token is stored as unsigned codes ``c = round((x - min(x)) / scale)``
in ``[0, qmax]`` (``qmax`` 255 for 8 bits, 15 for 4), with ``scale = (max(x) - min(x)) / qmax``
and the zero point ``zero = -min(x) / scale`` (in code units, not rounded), and read back as
``(c - zero) * scale``. So each element comes back within ``scale / 2`` of what was written
(plus float32 rounding), and a row's min and max come back (almost) exactly. A constant row
(``max == min``) is stored with scale 1 and comes back exactly.

Layout (``QuantizedPages``, one for K and one for V), beside each other in the same pool shape
as the unquantized ``[layers, kv_heads, num_blocks, block_size, head_dim]`` pages:

- ``codes`` uint8 ``[..., kv_heads, num_blocks, block_size, head_dim * bits // 8]``. 8 bits: one
  code per byte. 4 bits: two codes per byte, LMDeploy's packing: byte ``j`` holds element ``j``
  in its low nibble and element ``j + head_dim / 2`` in its high nibble.
- ``scale_zero`` float32 ``[..., kv_heads, num_blocks, block_size, 2]``: ``[..., 0]`` the scale,
  ``[..., 1]`` the zero point, as LMDeploy's ``k_scales_zeros``. Float32 rather than the model
  dtype: a zero point runs up to ``qmax`` and beyond, and bfloat16's 8 significant bits would
  move it by up to a whole code, doubling the error bound above.

A quantized pool thus holds ``head_dim * bits / 8 + 8`` bytes per token and KV head against
``head_dim * itemsize`` (``kv_block_bytes``): at head_dim 128 in bfloat16, 1.88 x the tokens
with 8 bits and 3.56 x with 4.

The attention ops take a ``QuantizedPages`` wherever they take a page pool (K and V both, with
the same ``bits``); they branch on it when traced, so the unquantized kernels are unchanged.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from ._dense import gather_pages

QUANT_BITS = (8, 4)                  # LMDeploy's quant_policy values: the bits per stored element
SCALE_ZERO_DTYPE = jnp.float32


def qmax(bits: int) -> int:
    """The largest code of ``bits``-bit quantization: 255 or 15."""
    return (1 << bits) - 1


@dataclasses.dataclass(frozen=True)
class QuantizedPages:
    """A quantized page pool (see the module docstring): ``codes`` uint8 and ``scale_zero``
    float32 arrays, and ``bits`` (8 or 4, static: part of the pytree's structure, so a jitted
    function retraces per policy). A pytree, so it passes through ``jit``, ``lax.scan`` carries
    and donation as the plain pool does; inside a Pallas kernel its fields are refs.

    ``shape`` is the logical shape, as the unquantized pool's (``head_dim`` unpacked)."""
    codes: jax.Array
    scale_zero: jax.Array
    bits: int = dataclasses.field(metadata=dict(static=True))

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-1] * 8 // self.bits

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-1], self.head_dim)

    @property
    def ndim(self) -> int:
        return len(self.codes.shape)


jax.tree_util.register_dataclass(QuantizedPages)


def is_quantized(pages) -> bool:
    return isinstance(pages, QuantizedPages)


def empty_pages(shape: tuple[int, ...], bits: int) -> QuantizedPages:
    """A zeroed quantized pool of logical ``shape`` ``[..., block_size, head_dim]`` (every
    element reads back as 0)."""
    if bits not in QUANT_BITS:
        raise ValueError(f'bits must be one of {QUANT_BITS} (LMDeploy\'s quant_policy), got {bits!r}')
    *lead, head_dim = shape
    if head_dim * bits % 8:
        raise ValueError(f'{bits}-bit pages need an even head_dim, got {head_dim}')
    return QuantizedPages(jnp.zeros((*lead, head_dim * bits // 8), jnp.uint8),
                          jnp.zeros((*lead, 2), SCALE_ZERO_DTYPE), bits)


def kv_block_bytes(layers: int, kv_heads: int, block_size: int, head_dim: int, dtype, bits: int | None = None) -> int:
    """Bytes one block of the cache takes, K and V of every layer: for pool sizing. ``bits``
    None: unquantized pages of ``dtype``; 8 or 4: codes plus float32 scale and zero."""
    per_row = head_dim * jnp.dtype(dtype).itemsize if bits is None else \
        head_dim * bits // 8 + 2 * jnp.dtype(SCALE_ZERO_DTYPE).itemsize
    return 2 * layers * kv_heads * block_size * per_row


# ---- the arithmetic: elementwise jnp, so the Pallas kernels run the very same ops in registers ----

def row_params(x, bits: int):
    """Per-row quantization of float32 ``x [..., head_dim]``: ``(low, inv_scale, scale, zero)``,
    each ``[..., 1]``. One division per row for ``inv_scale``, none per element."""
    low = x.min(axis=-1)[..., None]
    span = x.max(axis=-1)[..., None] - low
    flat = span > 0
    inv_scale = jnp.where(flat, qmax(bits) / jnp.where(flat, span, 1.0), 1.0)
    scale = jnp.where(flat, span * (1.0 / qmax(bits)), 1.0)
    return low, inv_scale, scale, -low * inv_scale


def to_codes(x, low, inv_scale, bits: int):
    """float32 ``x`` -> codes uint8 ``round((x - low) * inv_scale)`` in ``[0, qmax]`` (half up,
    as LMDeploy's ``+ 0.5`` then truncate)."""
    return jnp.clip(jnp.floor((x - low) * inv_scale + 0.5), 0, qmax(bits)).astype(jnp.uint8)


def from_codes(codes, scale, zero):
    """Codes (unpacked) -> float32 ``(codes - zero) * scale``."""
    return (codes.astype(jnp.float32) - zero) * scale


def pack_int4(codes):
    """4-bit codes uint8 ``[..., head_dim]`` -> bytes ``[..., head_dim / 2]``: element ``j`` in
    the low nibble, ``j + head_dim / 2`` in the high one (``lax.split``, which Triton lowers)."""
    half = codes.shape[-1] // 2
    low, high = lax.split(codes, (half, half), axis=codes.ndim - 1)
    return low | (high << 4)


def unpack_int4(packed):
    """``pack_int4``'s inverse: bytes ``[..., head_dim / 2]`` -> codes ``[..., head_dim]``."""
    return jnp.concatenate([packed & 15, packed >> 4], axis=-1)


def nibble_columns(head_dim: int):
    """How a kernel reads 4-bit element columns ``0 .. head_dim - 1`` straight from packed rows
    (no register shuffle): ``(byte, shift)`` ``[1, head_dim]``, element ``c`` being
    ``(row[byte[c]] >> shift[c]) & 15``. Each byte is loaded twice; the second load hits the
    cache."""
    cols = jnp.arange(head_dim)[None, :]
    half = head_dim // 2
    return lax.rem(cols, half), jnp.where(cols < half, 0, 4).astype(jnp.uint8)


def quantize(x, bits: int):
    """Rows ``x [..., head_dim]`` (any float dtype) -> ``(codes uint8 [..., head_dim * bits // 8],
    scale_zero float32 [..., 2])``."""
    x = x.astype(jnp.float32)
    low, inv_scale, scale, zero = row_params(x, bits)
    codes = to_codes(x, low, inv_scale, bits)
    return (pack_int4(codes) if bits == 4 else codes), jnp.concatenate([scale, zero], axis=-1)


def dequantize(codes, scale_zero, bits: int, dtype=jnp.float32):
    """``quantize``'s inverse, up to the rounding: ``[..., head_dim]`` of ``dtype``."""
    codes = unpack_int4(codes) if bits == 4 else codes
    return from_codes(codes, scale_zero[..., :1], scale_zero[..., 1:]).astype(dtype)


def gather_kv(pages, block_tables, layer, dtype):
    """The references' view of a pool: ``_dense.gather_pages`` of layer ``layer`` ->
    ``[B, kv_heads, M * block_size, head_dim]``; a quantized pool's codes and scales are gathered,
    then dequantized to ``dtype`` (the queries'), so the reference attends over what an unquantized
    pool holding the dequantized values would give."""
    if not is_quantized(pages):
        return gather_pages(pages, block_tables, layer)
    return dequantize(gather_pages(pages.codes, block_tables, layer),
                      gather_pages(pages.scale_zero, block_tables, layer), pages.bits, dtype)
