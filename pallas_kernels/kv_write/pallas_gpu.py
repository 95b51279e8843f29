"""The paged KV write as a Pallas kernel (Triton lowering), updating the pools in place.

Why this shape of kernel: a step writes N new K/V rows into pools of tens of GB, so the one thing
that matters is that the pools are never copied. The pools are inputs aliased to the outputs
(``input_output_aliases``), so XLA hands the kernel the pools' own buffers, and the kernel stores
only the N slots; every other byte stays as it was. The write then moves ~4 * N * kv_heads *
head_dim elements (K and V read from ``k_new``/``v_new``, written to the pools), the least it can.

Layout: the pools are viewed as token rows ``[layers * kv_heads, num_blocks * block_size,
head_dim]`` (``pool_rows``, a free reshape), so slot ``s`` of (layer, KV head ``h``) is row ``s`` of
pool row ``layer * kv_heads + h``, computed in the kernel (``layer_head``). One program owns
``block_tokens`` tokens of one KV head: it loads their slots and their ``[block_tokens, head_dim]``
K and V rows (contiguous ``head_dim`` rows: 16-byte, coalesced) and stores each row at its slot, K
and V in the same program (one launch per layer).
A quantized pool (``kv_quant.QuantizedPages``) gets each row quantized in registers
(``_pallas_tiles.store_quantized``: its min and max over head_dim, then codes, 4-bit ones packed
two to a byte) and its codes and scale/zero stored at its slot: as many bytes written as the pool
holds per token.
Padding tokens sharing a slot in block 0 race; which row (or mix of rows) lands there is
unspecified, and no sequence reads block 0.

In place only when the caller's pools are dead afterwards (inside the engine's jitted step, whose
pools are donated and carried through the scan over layers). Called on live arrays, e.g. eagerly,
XLA first copies each pool, as it would for the reference's scatter.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .._pallas_tiles import (layer_head, next_pow2, pool_aliases, pool_outputs, pool_rows, pool_stacks,
                             store_quantized, triton_supports)
from ..kv_quant import is_quantized


@dataclasses.dataclass(frozen=True)
class WriteConfig:
    """Launch knobs. ``block_tokens``: tokens per program (a power of two; fewer when N is
    smaller). No loop runs, so ``num_stages`` has nothing to pipeline."""
    block_tokens: int = 32
    num_warps: int = 4
    num_stages: int = 1


def supports(k_new, k_pages) -> bool:
    """Shapes and dtypes this kernel handles (Triton needs power-of-two tile extents)."""
    return triton_supports(k_new.dtype, k_pages.shape[-1])


def _write_kernel(layer_ref, slots_ref, k_new_ref, v_new_ref, _k_in, _v_in, k_ref, v_ref, *, kv_heads,
                  block_tokens):
    """Tokens ``[i * block_tokens, (i + 1) * block_tokens)`` of KV head ``h``. ``_k_in``/``_v_in``
    are the pools as inputs, the same buffers as ``k_ref``/``v_ref``: never read."""
    i, h = pl.program_id(0), pl.program_id(1)
    # Lanes past the last token repeat it: the same row to the same slot, so no mask is needed
    # (a masked lane would need some slot to aim at, and could only clash with a real write).
    tokens = jnp.minimum(i * block_tokens + jnp.arange(block_tokens), slots_ref.shape[0] - 1)
    slots = plgpu.load(slots_ref.at[tokens])
    rows, dst, cols = tokens[:, None], slots[:, None], jnp.arange(k_ref.shape[-1])[None, :]
    pool_head = layer_head(layer_ref, kv_heads, h)
    for new_ref, out_ref in ((k_new_ref, k_ref), (v_new_ref, v_ref)):
        if is_quantized(out_ref):
            store_quantized(out_ref, pool_head, dst, plgpu.load(new_ref.at[rows, h, cols]))
        else:
            plgpu.store(out_ref.at[pool_head, dst, cols], plgpu.load(new_ref.at[rows, h, cols]))


@functools.partial(jax.jit, static_argnames=('config', 'interpret'))
def write_kv_pallas(k_pages, v_pages, k_new, v_new, slot_mapping, layer,
                    config: WriteConfig = WriteConfig(), interpret: bool = False):
    """Same contract as ``api.write_kv`` (inputs already validated there; pools layer-stacked
    ``[layers, kv_heads, num_blocks, block_size, head_dim]``); returns the updated pools."""
    n, kv_heads, _ = k_new.shape
    block_tokens = min(config.block_tokens, next_pow2(n))
    k_rows, v_rows, layer = pool_rows(k_pages, v_pages, layer)
    k_rows, v_rows = pl.pallas_call(
        functools.partial(_write_kernel, kv_heads=kv_heads, block_tokens=block_tokens),
        grid=(pl.cdiv(n, block_tokens), kv_heads),
        out_shape=pool_outputs(k_rows, v_rows),
        input_output_aliases=pool_aliases(4, k_rows, v_rows),     # k_rows, v_rows -> the outputs
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name='write_kv',
    )(layer, slot_mapping, k_new, v_new, k_rows, v_rows)
    return pool_stacks(k_rows, k_pages), pool_stacks(v_rows, v_pages)
