"""Input validation shared by the ops' ``api.py``: shape and dtype mistakes fail at trace time with
a message naming the argument, instead of surfacing as an opaque XLA error inside the step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._dispatch import choose_impl
from .kv_quant import QUANT_BITS, SCALE_ZERO_DTYPE, is_quantized


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_pages(k_pages, v_pages) -> tuple[int, int, int, int]:
    """Check the two page pools agree; returns ``(kv_heads, num_blocks, block_size, head_dim)``.
    Pools are one layer's ``[kv_heads, num_blocks, block_size, head_dim]`` or every layer's,
    stacked: ``[layers, kv_heads, num_blocks, block_size, head_dim]``; either plain arrays, or
    both ``kv_quant.QuantizedPages`` of the same bits (shapes then logical, head_dim unpacked)."""
    require(is_quantized(k_pages) == is_quantized(v_pages),
            f'k_pages and v_pages must both be quantized or both not, got {type(k_pages).__name__} and '
            f'{type(v_pages).__name__}')
    if is_quantized(k_pages):
        for name, pages in (('k_pages', k_pages), ('v_pages', v_pages)):
            check_quantized(name, pages)
        require(k_pages.bits == v_pages.bits,
                f'k_pages ({k_pages.bits} bits) and v_pages ({v_pages.bits} bits) must have the same bits')
    require(k_pages.ndim in (4, 5), f'k_pages must be [kv_heads, num_blocks, block_size, head_dim] or '
                                    f'[layers, kv_heads, num_blocks, block_size, head_dim], got shape {k_pages.shape}')
    require(k_pages.shape == v_pages.shape,
            f'k_pages {k_pages.shape} and v_pages {v_pages.shape} must have the same shape')
    if not is_quantized(k_pages):
        require(k_pages.dtype == v_pages.dtype,
                f'k_pages ({k_pages.dtype}) and v_pages ({v_pages.dtype}) must have the same dtype')
    return tuple(k_pages.shape[-4:])


def check_quantized(name: str, pages) -> None:
    """A ``QuantizedPages``' fields (``kv_quant``'s layout): uint8 codes, float32 ``scale_zero``
    of the codes' shape but a last axis of 2, bits 8 or 4."""
    require(pages.bits in QUANT_BITS, f'{name}.bits must be one of {QUANT_BITS}, got {pages.bits!r}')
    require(pages.codes.dtype == jnp.uint8, f'{name}.codes must be uint8, got {pages.codes.dtype}')
    expected = (*pages.codes.shape[:-1], 2)
    require(pages.scale_zero.dtype == SCALE_ZERO_DTYPE and tuple(pages.scale_zero.shape) == expected,
            f'{name}.scale_zero must be float32 {expected}, got {pages.scale_zero.dtype} '
            f'{tuple(pages.scale_zero.shape)}')


def check_values(name: str, x, pages) -> None:
    """``x`` (new K/V, queries) must be of the pages' dtype, or, for quantized pages, of a float
    dtype (the kernels dequantize to it)."""
    if is_quantized(pages):
        require(jnp.issubdtype(x.dtype, jnp.floating), f'{name} must be a float dtype, got {x.dtype}')
    else:
        require(x.dtype == pages.dtype, f'{name} dtype {x.dtype} does not match the pages\' dtype {pages.dtype}')


def stacked(k_pages, v_pages, layer) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The pools as layer-stacked ``[layers, ...]`` and the layer to use, int32: one layer's pools
    become a stack of one (``layer`` must then be None or 0). Quantized pools likewise."""
    if k_pages.ndim == 4:
        layer = layer_index(layer, False, 'single-layer pages [kv_heads, num_blocks, block_size, head_dim]')
        return jax.tree.map(lambda a: a[None], k_pages), jax.tree.map(lambda a: a[None], v_pages), layer
    return k_pages, v_pages, layer_index(layer, True, 'layer-stacked pages [layers, kv_heads, ...]')


def unstacked(pages):
    """``stacked``'s inverse for one layer's pools: the stack of one's only layer."""
    return jax.tree.map(lambda a: a[0], pages)


def layer_index(layer, is_stack: bool, what: str) -> jax.Array:
    """The int32 scalar layer to read of an input ``what``: 0 for one layer given alone (``layer``
    then None or 0), else ``layer`` itself, required."""
    if not is_stack:
        require(layer is None or (isinstance(layer, int) and layer == 0), f'layer={layer!r} given for {what}')
        return jnp.zeros((), jnp.int32)
    require(layer is not None, f'{what} need the layer to use')
    layer = jnp.asarray(layer, jnp.int32) if isinstance(layer, int) else layer
    require(layer.shape == () and layer.dtype == jnp.int32, f'layer must be an int32 scalar, got {layer!r}')
    return layer


def stacked_weight(weight: jax.Array, layer, hidden: int) -> tuple[jax.Array, jax.Array]:
    """``weight`` as ``[layers, hidden]`` and the int32 layer to use (one layer's weight: a stack of one)."""
    if weight.ndim == 1:
        require(tuple(weight.shape) == (hidden,),
                f'weight must have shape ({hidden},) to match x [..., {hidden}], got {tuple(weight.shape)}')
        return weight[None], layer_index(layer, False, 'a single weight [hidden]')
    require(weight.ndim == 2 and weight.shape[1] == hidden,
            f'weight must be [{hidden}] or stacked [layers, {hidden}] to match x [..., {hidden}], '
            f'got {tuple(weight.shape)}')
    return weight, layer_index(layer, True, 'stacked weights [layers, hidden]')


def check_int32(name: str, x, shape: tuple[int, ...] | None = None) -> None:
    require(x.dtype == jnp.int32, f'{name} must be int32, got {x.dtype}')
    require(shape is None or tuple(x.shape) == shape,
            f'{name} must have shape {shape}, got {tuple(x.shape)}')


def check_query(q, k_pages, batch: int | None = None) -> None:
    """``q [..., heads, head_dim]`` must match the pages' dtype and head_dim, with heads a multiple
    of the pages' kv_heads (grouped-query attention)."""
    kv_heads, _, _, head_dim = k_pages.shape[-4:]
    heads, d = q.shape[-2:]
    require(d == head_dim, f'q head_dim {d} does not match the pages\' head_dim {head_dim}')
    require(heads % kv_heads == 0,
            f'q heads ({heads}) must be a multiple of the pages\' kv_heads ({kv_heads})')
    check_values('q', q, k_pages)
    if batch is not None:
        require(q.shape[0] == batch, f'q has {q.shape[0]} rows but block_tables has {batch}')


def check_paged_attention_inputs(q, k_pages, v_pages, block_tables, context_lens, q_layout: str) -> None:
    """What both attention ops require: ``q`` of ``q_layout`` (e.g. ``'[B, heads, head_dim]'``, its
    rank taken from the layout) against the page pools, one block-table row and context length per
    query row."""
    check_pages(k_pages, v_pages)
    require(q.ndim == q_layout.count(',') + 1, f'q must be {q_layout}, got shape {q.shape}')
    require(block_tables.ndim == 2, f'block_tables must be [B, M], got shape {block_tables.shape}')
    check_query(q, k_pages, batch=block_tables.shape[0])
    check_int32('block_tables', block_tables)
    check_int32('context_lens', context_lens, (q.shape[0],))


def check_fused_qkv(qkv, k_pages) -> int:
    """``qkv [B, (heads + 2 * kv_heads) * head_dim]`` (q heads, then k heads, then v heads) of the
    pages' dtype, heads a positive multiple of the pages' kv_heads; returns heads."""
    kv_heads, _, _, head_dim = k_pages.shape[-4:]
    require(qkv.ndim == 2, f'qkv must be [B, (heads + 2 * kv_heads) * head_dim], got shape {qkv.shape}')
    check_values('qkv', qkv, k_pages)
    width = qkv.shape[1]
    heads = width // head_dim - 2 * kv_heads
    require(width % head_dim == 0 and heads > 0 and heads % kv_heads == 0,
            f'qkv width {width} must be (heads + 2 * {kv_heads}) * {head_dim} with heads a positive multiple '
            f'of the pages\' kv_heads ({kv_heads})')
    return heads


def check_rope_tables(cos, sin, batch: int, head_dim: int) -> None:
    """float32 ``[B, head_dim]`` rope tables, head_dim even (rotate-half pairs its halves)."""
    require(head_dim % 2 == 0, f'rope needs an even head_dim, got {head_dim}')
    for name, x in (('cos', cos), ('sin', sin)):
        require(x.dtype == jnp.float32 and tuple(x.shape) == (batch, head_dim),
                f'{name} must be float32 [{batch}, {head_dim}], got {x.dtype} {tuple(x.shape)}')


def check_window_and_cap(sliding_window, logits_soft_cap) -> tuple[jax.Array | None, float | None]:
    """The attention ops' ``sliding_window`` and ``logits_soft_cap``, checked; returns the window
    as an int32 scalar array (None: no window) and the cap as a float (None: no cap).

    ``sliding_window``: None or 0 for none; a positive int, or an int32 scalar array (traced, e.g.
    a per-layer value inside a scan over layers, where values <= 0 mean no window): a query at
    position ``p`` sees keys at ``p - sliding_window < k <= p``, Hugging Face's convention.
    ``logits_soft_cap``: None, or a positive number: the scaled scores become
    ``cap * tanh(scores / cap)`` before the mask and the softmax (Gemma 2's soft-capping)."""
    window = sliding_window
    if window is None or isinstance(window, (int, np.integer)) and not isinstance(window, bool):
        require(window is None or window >= 0,
                f'sliding_window must be None, 0 (no window) or a positive int, got {window!r}')
        window = jnp.asarray(window, jnp.int32) if window else None
    else:
        require(isinstance(window, jax.Array) and window.shape == () and jnp.issubdtype(window.dtype, jnp.integer),
                f'sliding_window must be an int or an integer scalar array, got {window!r}')
        window = window.astype(jnp.int32)
    cap = logits_soft_cap
    require(cap is None or isinstance(cap, (int, float, np.floating)) and not isinstance(cap, bool) and cap > 0,
            f'logits_soft_cap must be None or a positive float, got {cap!r}')
    return window, None if cap is None else float(cap)


def choose_kernel(impl: str | None, why_not: str | None) -> str:
    """``_dispatch.choose_impl`` for a kernel that cannot take these inputs when ``why_not`` (the
    reason) is given: the error of naming it then says why."""
    try:
        return choose_impl(impl, why_not is None)
    except ValueError as e:
        raise ValueError(f'{e}: {why_not}' if why_not else str(e)) from None
