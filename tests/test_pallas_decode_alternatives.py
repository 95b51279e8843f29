"""The decode kernels the API never dispatches to, kept for benchmarking in ``benchmark/experiments``:
the decode attention alone (``paged_decode.py``, the Pallas kernel the decode step fuses, in
interpret mode), Mosaic GPU (``mosaic_gpu.py``, in JAX's Mosaic GPU interpreter and lowered for
CUDA) and jax_triton (``triton_jax.py``, compiled by Triton for sm_90). No GPU is needed; with
``LMDEPLOY_JAX_KERNELS=pallas`` the Mosaic kernel runs on the GPU instead of the interpreter."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_cases import INTERPRET, KERNEL, ON_GPU, SCALE, assert_matches, decode_case, lower_for_cuda, window_lens

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmark'))   # as bench_kernels.py imports them
from experiments import mosaic_gpu as decode_mosaic  # noqa: E402
from experiments import paged_decode  # noqa: E402
from experiments import triton_jax as decode_triton  # noqa: E402


@pytest.mark.parametrize('block_size,group,window,soft_cap,dtype,config', [
    (16, 4, 20, 1.0, jnp.float32, paged_decode.DecodeConfig(tile_tokens=16, num_splits=3, page_tiles=True)),
    (32, 3, None, None, jnp.bfloat16, None)])
def test_paged_decode_matches_reference(rng, block_size, group, window, soft_cap, dtype, config):
    """Layer 1 of a poisoned stack, at forced splits over page tiles with a window and soft cap,
    or through the op with its default launch; rows of ``window_lens`` (empty, one position,
    several pages)."""
    lens = window_lens(block_size, window or 2 * block_size)
    options = dict(sliding_window=window, logits_soft_cap=soft_cap)
    pools, q, ref = decode_case(rng, block_size, group, lens, dtype, **options)
    if config is None:
        out = paged_decode.paged_decode_attention(q, *pools.stacked(1, 2), *pools.tables(), SCALE, jnp.int32(1),
                                                  impl=KERNEL)
    else:
        out = paged_decode.paged_decode_attention_pallas(q, *pools.stacked(1, 2), jnp.int32(1), *pools.tables(),
                                                         SCALE, jnp.int32(window), soft_cap, config=config,
                                                         interpret=INTERPRET)
    assert out.dtype == dtype
    assert_matches(out, ref, dtype, lens == 0)


def mosaic_interpreter():
    """JAX's Mosaic GPU interpreter (private; 0.10) with its race detector, or a skip."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:
        pytest.skip(f'no Mosaic GPU interpreter in this JAX: {e}')
    return InterpretGPUParams(detect_races=True), interpret_pallas_call


@pytest.mark.parametrize('block_size,group,num_splits,dtype', [
    (16, 4, None, jnp.bfloat16), (32, 3, 3, jnp.float16), (64, 4, 1, jnp.bfloat16), (128, 8, 2, jnp.bfloat16)])
def test_mosaic_decode_matches_reference(rng, block_size, group, num_splits, dtype):
    """The Mosaic GPU kernel in JAX's Mosaic GPU interpreter (TMA copies, barriers and shared memory
    simulated, races detected; the two wgmmas there are jnp.dots of the same tiles): layer 1 of a
    poisoned stack; rows of length 0, mid-page, whole pages, 40 positions of 16-position pages (a
    64-row step past the table's end); splits with no steps."""
    params, interpreter = (False, None) if ON_GPU else mosaic_interpreter()
    lens = [1, 0, block_size + 3, 2 * block_size, 40 if block_size == 16 else 5 * block_size - 7]
    pools, q, ref = decode_case(rng, block_size, group, lens, dtype, head_dim=128)
    config = decode_mosaic.MosaicConfig(num_splits=num_splits, stages=2)
    assert decode_mosaic.supports(q, pools.stacked(1, 2)[0])
    out = decode_mosaic.paged_decode_attention_mosaic(q, *pools.stacked(1, 2), jnp.int32(1), *pools.tables(), SCALE,
                                                      config=config, interpret=params)
    assert interpreter is None or not interpreter.get_races().races_found
    assert out.dtype == dtype
    assert_matches(out, ref, dtype, np.asarray(lens) == 0)


@pytest.mark.parametrize('semantics', [None, 'warpgroup'])
@pytest.mark.parametrize('batch,block_size,num_splits,launches', [(64, 64, None, 1), (1, 64, None, 2), (3, 16, 1, 1),
                                                                  (2, 128, 4, 2)])
def test_mosaic_decode_lowers_for_cuda(batch, block_size, num_splits, launches, semantics):
    """Lowered for CUDA without a GPU, Mosaic GPU checks what the interpreter does not: wgmma operand
    shapes and layouts, tiling of every copy, the shared-memory budget. Llama3-8b heads, bf16;
    batch 1 splits the sequence (the kernel, then ``combine_splits``), batch 64 does not. Warpgroup
    semantics run Mosaic GPU's constraint-based layout and transform inference (which found a query
    copy from any row into the swizzled tiles unsatisfiable: the failure on JAX 0.11)."""
    shape = jax.ShapeDtypeStruct
    pools = shape((2, 8, 4 * batch * 2048 // block_size, block_size, 128), jnp.bfloat16)
    args = (shape((batch, 32, 128), jnp.bfloat16), pools, pools, shape((), jnp.int32),
            shape((batch, 2048 // block_size), jnp.int32), shape((batch,), jnp.int32))
    config = decode_mosaic.MosaicConfig(num_splits=num_splits, semantics=semantics)
    text = lower_for_cuda(functools.partial(decode_mosaic.paged_decode_attention_mosaic, scale=SCALE, config=config),
                          *args)
    assert text.count('@mosaic_gpu') == 1
    assert text.count('stablehlo.custom_call') == launches


@pytest.mark.parametrize('dtype,block_size,group,num_splits,tile_tokens', [
    (jnp.bfloat16, 64, 4, 1, 64), (jnp.bfloat16, 64, 4, 8, 64), (jnp.bfloat16, 16, 3, 1, 64),
    (jnp.float32, 128, 1, 2, 64), (jnp.float16, 32, 8, 1, 128)])
def test_triton_decode_compiles_for_sm90(dtype, block_size, group, num_splits, tile_tokens):
    """The jax_triton kernel through Triton's whole pipeline to an sm_90 cubin, without a GPU
    (triton comes with the test extra; jax_triton itself needs a CUDA jaxlib, so the call is
    checked on the GPU by ``bench_kernels.py --impls jax_triton``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    q = jax.ShapeDtypeStruct((4, 8 * group, 128), dtype)
    pools = jax.ShapeDtypeStruct((2, 8, 100, block_size, 128), dtype)
    tables = jax.ShapeDtypeStruct((4, 2048 // block_size), jnp.int32)
    config = decode_triton.TritonConfig(tile_tokens=tile_tokens, num_splits=num_splits)
    consts = decode_triton.kernel_constants(q, pools, tables, SCALE, config)
    types = {jnp.bfloat16: 'bf16', jnp.float16: 'fp16', jnp.float32: 'fp32'}
    out = types[dtype] if num_splits == 1 else 'fp32'
    signature = dict(layer_ptr='*i32', lens_ptr='*i32', tables_ptr='*i32', q_ptr=f'*{types[dtype]}',
                     k_ptr=f'*{types[dtype]}', v_ptr=f'*{types[dtype]}', o_ptr=f'*{out}', m_ptr='*fp32', l_ptr='*fp32',
                     **dict.fromkeys(consts, 'constexpr'))
    source = triton.compiler.ASTSource(decode_triton.triton_kernel(), signature, constexprs=consts)
    compiled = triton.compile(source, target=GPUTarget('cuda', 90, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    assert consts['NUM_SPLITS'] == num_splits
    assert compiled.asm['cubin'] and '.target sm_90' in compiled.asm['ptx']
