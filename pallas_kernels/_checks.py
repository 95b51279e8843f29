"""Input validation shared by the ops' ``api.py``: shape and dtype mistakes fail at trace time with
a message naming the argument, instead of surfacing as an opaque XLA error inside the step."""
from __future__ import annotations

import jax.numpy as jnp


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_pages(k_pages, v_pages) -> tuple[int, int, int, int]:
    """Check the two page pools agree; returns ``(kv_heads, num_blocks, block_size, head_dim)``."""
    require(k_pages.ndim == 4, f'k_pages must be [kv_heads, num_blocks, block_size, head_dim], '
                               f'got shape {k_pages.shape}')
    require(k_pages.shape == v_pages.shape,
            f'k_pages {k_pages.shape} and v_pages {v_pages.shape} must have the same shape')
    require(k_pages.dtype == v_pages.dtype,
            f'k_pages ({k_pages.dtype}) and v_pages ({v_pages.dtype}) must have the same dtype')
    return tuple(k_pages.shape)


def check_int32(name: str, x, shape: tuple[int, ...] | None = None) -> None:
    require(x.dtype == jnp.int32, f'{name} must be int32, got {x.dtype}')
    require(shape is None or tuple(x.shape) == shape,
            f'{name} must have shape {shape}, got {tuple(x.shape)}')


def check_query(q, k_pages, batch: int | None = None) -> None:
    """``q [..., heads, head_dim]`` must match the pages' dtype and head_dim, with heads a multiple
    of the pages' kv_heads (grouped-query attention)."""
    kv_heads, _, _, head_dim = k_pages.shape
    heads, d = q.shape[-2:]
    require(d == head_dim, f'q head_dim {d} does not match the pages\' head_dim {head_dim}')
    require(heads % kv_heads == 0,
            f'q heads ({heads}) must be a multiple of the pages\' kv_heads ({kv_heads})')
    require(q.dtype == k_pages.dtype, f'q dtype {q.dtype} does not match the pages\' dtype {k_pages.dtype}')
    if batch is not None:
        require(q.shape[0] == batch, f'q has {q.shape[0]} rows but block_tables has {batch}')
