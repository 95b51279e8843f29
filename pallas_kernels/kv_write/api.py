"""The KV write the models call. Only the XLA reference exists for now; GPU kernels go behind
this function, so the models never change when one is added."""
from __future__ import annotations

import jax

from .._checks import check_int32, check_pages, require
from .reference import write_kv_reference


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k_new: jax.Array, v_new: jax.Array,
             slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write ``k_new``/``v_new`` ``[N, kv_heads, head_dim]`` into slots ``slot_mapping`` int32 ``[N]``
    of the pools ``[kv_heads, num_blocks, block_size, head_dim]``; returns the updated pools.

    Several padding tokens may share a slot in block 0 (which no sequence reads); which one wins
    is unspecified.
    """
    kv_heads, _, _, head_dim = check_pages(k_pages, v_pages)
    expected = (k_new.shape[0], kv_heads, head_dim)
    for name, x in (('k_new', k_new), ('v_new', v_new)):
        require(tuple(x.shape) == expected, f'{name} must have shape {expected}, got {tuple(x.shape)}')
        require(x.dtype == k_pages.dtype,
                f'{name} dtype {x.dtype} does not match the pages\' dtype {k_pages.dtype}')
    check_int32('slot_mapping', slot_mapping, (k_new.shape[0],))
    return write_kv_reference(k_pages, v_pages, k_new, v_new, slot_mapping)
