"""The KV write kernel (``pallas_kernels/kv_write/pallas_gpu.py``) against its XLA reference's scatter.

The kernel must leave the pools exactly as the reference does, every other layer and slot included,
except slot 0, where padding tokens race and any of their values may land. The harness (interpret
mode or the GPU) is ``pallas_cases``."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_cases import HEAD_DIM, INTERPRET, KERNEL, lower_for_cuda

from pallas_kernels.kv_write import pallas_gpu as write_gpu
from pallas_kernels.kv_write.api import write_kv


def kv_write_case(rng, block_size, kv_heads, dtype, n, layers=None, padding=3, num_blocks=6):
    """Random pools (``layers`` None: one layer's), ``n`` new tokens at distinct random slots
    outside block 0, of which ``padding`` (at random positions) are padding tokens at slot 0:
    ``(k_pages, v_pages, k_new, v_new, slots, the padding tokens' indices)``."""
    shape = (kv_heads, num_blocks, block_size, HEAD_DIM)
    shape = shape if layers is None else (layers, *shape)
    k_pages, v_pages = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(2))
    k_new, v_new = (jnp.asarray(rng.standard_normal((n, kv_heads, HEAD_DIM), np.float32), dtype)
                    for _ in range(2))
    slots = rng.choice(np.arange(block_size, num_blocks * block_size), n, replace=False).astype(np.int32)
    pad = rng.choice(n, min(padding, n), replace=False)
    slots[pad] = 0
    return k_pages, v_pages, k_new, v_new, jnp.asarray(slots), pad


def assert_written(out, ref, new, pad, layer):
    """``out`` equals the reference's pools exactly, except at slot 0 of the written layer, where
    padding tokens race: each element there must come from one of them."""
    out, ref, new = (np.array(x.astype(jnp.float32)) for x in (out, ref, new))
    if out.ndim == 4:
        out, ref = out[None], ref[None]
    head_rows = out[layer, :, 0, 0].copy()                        # [kv_heads, head_dim]
    out[layer, :, 0, 0] = ref[layer, :, 0, 0] = 0
    np.testing.assert_array_equal(out, ref)
    if len(pad):
        assert (head_rows[None] == new[pad]).any(axis=0).all(), 'slot 0 holds no padding token\'s value'


@pytest.mark.parametrize('block_size,kv_heads,dtype,layers', [
    (16, 1, jnp.float32, None), (32, 2, jnp.bfloat16, 3), (64, 3, jnp.float32, 3), (16, 3, jnp.bfloat16, None)])
def test_kv_write_matches_reference(rng, block_size, kv_heads, dtype, layers):
    """Single-layer pools, or layer 1 of a stack of 3 (the others must stay exactly as they were),
    under jit with the layer traced; N not a multiple of the kernel's token block."""
    n = 2 * block_size + 5
    k_pages, v_pages, k_new, v_new, slots, pad = kv_write_case(rng, block_size, kv_heads, dtype, n, layers)
    layer = None if layers is None else jnp.int32(1)
    ref = write_kv(k_pages, v_pages, k_new, v_new, slots, layer, impl='reference')
    out = jax.jit(functools.partial(write_kv, impl=KERNEL))(k_pages, v_pages, k_new, v_new,
                                                            slots, layer)
    for o, r, new in zip(out, ref, (k_new, v_new)):
        assert o.shape == r.shape and o.dtype == dtype
        assert_written(o, r, new, pad, 0 if layers is None else 1)


def test_kv_write_one_token_and_small_token_blocks(rng):
    """N = 1 (the block shrinks to one token) into the pools' very last slot; then blocks of 4
    tokens over 13 (several programs per head, a ragged last one)."""
    k_pages, v_pages, k_new, v_new, _, _ = kv_write_case(rng, 16, 2, jnp.bfloat16, 1, padding=0)
    last = jnp.asarray([k_pages.shape[1] * 16 - 1], jnp.int32)
    ref = write_kv(k_pages, v_pages, k_new, v_new, last, impl='reference')
    out = write_kv(k_pages, v_pages, k_new, v_new, last, impl=KERNEL)
    for o, r, new in zip(out, ref, (k_new, v_new)):
        assert_written(o, r, new, [], 0)
    k_pages, v_pages, k_new, v_new, slots, pad = kv_write_case(rng, 16, 3, jnp.float32, 13, layers=2)
    ref = write_kv(k_pages, v_pages, k_new, v_new, slots, 0, impl='reference')
    out = write_gpu.write_kv_pallas(k_pages, v_pages, k_new, v_new, slots, jnp.int32(0),
                                    config=write_gpu.WriteConfig(block_tokens=4), interpret=INTERPRET)
    for o, r, new in zip(out, ref, (k_new, v_new)):
        assert_written(o, r, new, pad, 0)


def test_kv_write_in_a_scan_over_layers(rng):
    """As the model calls it: the pools carried through a ``lax.scan`` whose index is the layer,
    each layer writing its own K/V to the same slots."""
    layers, n = 4, 21
    k_pages, v_pages, _, _, slots, pad = kv_write_case(rng, 32, 2, jnp.bfloat16, n, layers)
    k_new, v_new = (jnp.asarray(rng.standard_normal((layers, n, 2, HEAD_DIM)), jnp.bfloat16) for _ in range(2))

    def run(impl):
        def step(pools, xs):
            k, v, layer = xs
            return write_kv(*pools, k, v, slots, layer, impl=impl), None
        return jax.jit(lambda pools: jax.lax.scan(step, pools, (k_new, v_new, jnp.arange(layers, dtype=jnp.int32)))[0])(
            (k_pages, v_pages))

    out, ref = run(KERNEL), run('reference')
    for o, r, new in zip(out, ref, (k_new, v_new)):
        for layer in range(layers):
            assert_written(o[layer], r[layer], new[layer], pad, 0)


def test_kv_write_aliases_the_pools_in_the_gpu_lowering():
    """The in-place contract, checked without a GPU: lowered for CUDA, the kernel's call aliases
    the pool operands to its outputs, and a jit that donates the pools reuses their buffers."""
    pools = jax.ShapeDtypeStruct((2, 2, 4, 16, HEAD_DIM), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((5, 2, HEAD_DIM), jnp.bfloat16)
    text = lower_for_cuda(functools.partial(write_kv, impl='pallas'), pools, pools, new, new,
                          jax.ShapeDtypeStruct((5,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
                          donate_argnums=(0, 1))
    assert text.count('stablehlo.custom_call') == 1
    for out, operand in ((0, 4), (1, 5)):
        assert (f'output_tuple_indices = [{out}], operand_index = {operand},') in text
        assert f'tf.aliasing_output = {out}' in text


def test_kv_write_supports_power_of_two_head_dims():
    pages = jnp.zeros((1, 2, 4, 16, 48), jnp.float32)
    assert not write_gpu.supports(jnp.zeros((3, 2, 48), jnp.float32), pages)
    assert write_gpu.supports(jnp.zeros((3, 2, 64), jnp.bfloat16), jnp.zeros((1, 2, 4, 16, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match='does not support'):
        write_kv(pages[0], pages[0], jnp.zeros((3, 2, 48)), jnp.zeros((3, 2, 48)), jnp.zeros((3,), jnp.int32),
                 impl=KERNEL)
