"""The KV write the models call: the Pallas kernel on a GPU, the XLA reference elsewhere, behind
one function, so the models never change when an implementation does."""
from __future__ import annotations

import jax

from .._checks import check_int32, check_pages, check_values, require, stacked, unstacked
from .._dispatch import choose_impl
from ..kv_quant import QuantizedPages
from .reference import write_kv_reference


def write_kv(k_pages: jax.Array | QuantizedPages, v_pages: jax.Array | QuantizedPages, k_new: jax.Array,
             v_new: jax.Array, slot_mapping: jax.Array, layer: jax.Array | int | None = None, *,
             impl: str | None = None) -> tuple[jax.Array | QuantizedPages, jax.Array | QuantizedPages]:
    """Write ``k_new``/``v_new`` ``[N, kv_heads, head_dim]`` into slots ``slot_mapping`` int32 ``[N]``
    of the pools ``[kv_heads, num_blocks, block_size, head_dim]`` (or of layer ``layer`` of
    layer-stacked pools ``[layers, ...]``); returns the updated pools, shaped as given.

    Quantized pools (``kv_quant.QuantizedPages``, both K and V, LMDeploy's ``quant_policy`` 8 or
    4): each new head row is quantized as it is written (``kv_quant.quantize``: asymmetric, per
    token and KV head), its codes and its scale and zero point stored at its slot; ``k_new`` and
    ``v_new`` may then be of any float dtype. Returns ``QuantizedPages`` shaped as given.

    Several padding tokens may share a slot in block 0 (which no sequence reads); which one wins
    is unspecified. ``impl``: see ``pallas_kernels._dispatch`` (default: the Pallas kernel on a
    GPU, which updates the pools in place when the caller's pools are dead afterwards).
    """
    kv_heads, _, _, head_dim = check_pages(k_pages, v_pages)
    expected = (k_new.shape[0], kv_heads, head_dim)
    for name, x in (('k_new', k_new), ('v_new', v_new)):
        require(tuple(x.shape) == expected, f'{name} must have shape {expected}, got {tuple(x.shape)}')
        check_values(name, x, k_pages)
    check_int32('slot_mapping', slot_mapping, (k_new.shape[0],))
    single_layer = k_pages.ndim == 4
    k_pages, v_pages, layer = stacked(k_pages, v_pages, layer)
    # -- implementation choice: the Pallas GPU kernel, else the reference --
    from . import pallas_gpu
    chosen = choose_impl(impl, pallas_gpu.supports(k_new, k_pages))
    if chosen != 'reference':
        k_pages, v_pages = pallas_gpu.write_kv_pallas(k_pages, v_pages, k_new, v_new, slot_mapping, layer,
                                                      interpret=chosen == 'pallas_interpret')
    else:
        k_pages, v_pages = write_kv_reference(k_pages, v_pages, k_new, v_new, slot_mapping, layer)
    return (unstacked(k_pages), unstacked(v_pages)) if single_layer else (k_pages, v_pages)
