"""Which implementation the attention ops run, and the limits that decide it: the dispatcher's
choice on a CPU, head sizes the kernels refuse (with the reason, or the reference under ``auto``),
and the largest they take (Gemma's 256-wide heads) compiled for sm_90 within its shared memory,
without a GPU."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from pallas_cases import KERNEL, ON_GPU, SCALE, SM90_SHARED_BYTES, assert_kernels_alone, compile_for_sm90

from pallas_kernels._dispatch import choose_impl
from pallas_kernels.decode_step_attention.api import decode_step_attention
from pallas_kernels.prefill_attention.api import paged_prefill_attention


@pytest.mark.skipif(ON_GPU, reason='the CPU\'s dispatch')
def test_dispatch_takes_the_reference_on_cpu_and_rejects_unknown_names(monkeypatch):
    monkeypatch.delenv('LMDEPLOY_JAX_KERNELS', raising=False)
    assert choose_impl(None, supported=True) == 'reference'
    assert choose_impl('pallas_interpret', supported=True) == 'pallas_interpret'
    with pytest.raises(ValueError, match='unknown'):
        choose_impl('cuda', supported=True)
    with pytest.raises(ValueError, match='does not support'):
        choose_impl('pallas', supported=False)


def test_attention_kernels_refuse_unsupported_heads_with_the_reason():
    """Head dims the kernels cannot take run on the reference under ``auto``; naming the kernel
    says why."""
    tables, lens = jnp.ones((3, 2), jnp.int32), jnp.ones((3,), jnp.int32)
    for head_dim in (96, 512, 8):
        pages = jnp.ones((2, 4, 16, head_dim), jnp.bfloat16)
        q = jnp.ones((3, 4, head_dim), jnp.bfloat16)
        qkv, rope_table = jnp.ones((3, 8 * head_dim), jnp.bfloat16), jnp.ones((3, head_dim), jnp.float32)
        step = (qkv, rope_table, rope_table, pages, pages, None, lens, tables, lens, SCALE)
        with pytest.raises(ValueError, match=f'does not support.*heads of {head_dim} elements.*from 16 to 256'):
            decode_step_attention(*step, impl=KERNEL)
        with pytest.raises(ValueError, match=f'heads of {head_dim} elements'):
            paged_prefill_attention(q[:, None], pages, pages, tables, lens, lens, SCALE, impl=KERNEL)
    assert decode_step_attention(*step, impl='auto')[0].shape == q.shape  # the reference
    pages = jnp.ones((1, 4, 16, 32), jnp.float32)
    with pytest.raises(ValueError, match='128 query heads per KV head: the prefill kernel takes at most 64'):
        paged_prefill_attention(jnp.ones((3, 1, 128, 32)), pages, pages, tables, lens, lens, SCALE,
                                impl=KERNEL)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_windowed_soft_capped_kernels_fit_sm90_at_head_dim_256(monkeypatch, tmp_path, dtype):
    """Gemma's 256-wide heads, a traced sliding window and a soft cap, through each op's API at
    its default launch: every kernel compiles for sm_90 within sm_90's shared memory per block,
    and the window adds no XLA op around the kernels (it is passed by a free reshape)."""
    shape, hd = jax.ShapeDtypeStruct, 256
    pools, layer, window = shape((2, 8, 256, 64, hd), dtype), shape((), jnp.int32), shape((), jnp.int32)
    tables, lens = shape((4, 64), jnp.int32), shape((4,), jnp.int32)
    options = dict(logits_soft_cap=50.0, impl='pallas')
    cases = [
        (lambda x, c, s_, k, v, i, sl, t, n, w: decode_step_attention(x, c, s_, k, v, i, sl, t, n, SCALE,
                                                                     sliding_window=w, **options),
         (shape((4, 32 * hd), dtype), shape((4, hd), jnp.float32), shape((4, hd), jnp.float32), pools, pools, layer,
          lens, tables, lens, window)),
        (lambda q, k, v, i, t, n, m, w: paged_prefill_attention(q, k, v, t, n, m, SCALE, i, sliding_window=w,
                                                                **options),
         (shape((4, 128, 16, hd), dtype), pools, pools, layer, tables, lens, lens, window))]
    for fn, args in cases:
        text, shared = compile_for_sm90(monkeypatch, tmp_path, fn, *args)
        assert_kernels_alone(text)
        assert shared and max(shared.values()) <= SM90_SHARED_BYTES, shared
