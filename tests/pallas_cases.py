"""The shared harness of the ``test_pallas_*.py`` files: which kernels they run, random paged pools
with poisoned slots, the attention cases and their checks, and lowering for CUDA without a GPU.

The kernels run interpreted on the CPU; with ``LMDEPLOY_JAX_KERNELS=pallas`` they are compiled and
run on the GPU instead (``benchmark/check_kernels_gpu.sh``). Kernels are also compiled for sm_90
without a GPU (``compile_for_sm90``) to check their shared memory.

Every case draws fresh random inputs: random non-contiguous block tables, ragged lengths (0, ends
mid-page, whole pages, several tiles), several block sizes and GQA ratios. The pools a kernel
reads hold NaN at every slot no sequence owns (page tails past a row's length, pages behind the
table's padding entries), while the reference reads a clean copy: a kernel that reads a byte
outside a row's context fails. Interpret mode starts every output as NaN, so an output element
the kernel never writes fails too.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmdeploy_jax.settings import current as current_settings
from pallas_kernels.decode_step_attention.api import decode_step_attention
from pallas_kernels.decode_step_attention.reference import paged_decode_attention_reference

# The kernels as the tests run them: interpreted on the CPU, or compiled for the GPU when asked.
ON_GPU = current_settings().kernels == 'pallas'
KERNEL, INTERPRET = ('pallas', False) if ON_GPU else ('pallas_interpret', True)
KV_HEADS, HEAD_DIM = 2, 32
SCALE = HEAD_DIM ** -0.5
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}

SM90_SHARED_BYTES = 227 * 1024      # the most shared memory one block may take on sm_90

# (block_size, tile_tokens, dtype, num_splits) of the decode kernels' ``page_tiles``: tiles of a
# quarter page (f32 halves tile_tokens), of a whole page, and over two pages (page_tiles falls back
# to per-position addressing).
PAGE_TILE_CASES = [(64, 32, jnp.float32, 3), (32, 32, jnp.bfloat16, 2), (16, 64, jnp.float32, 4)]


class Pools:
    """Random pools ``[KV_HEADS, blocks, block_size, head_dim]`` behind random tables. ``clean``
    has random values everywhere; ``poisoned`` is the same with NaN in every slot outside the
    rows' cached positions: their contexts, or only the first ``cached_lens`` positions of them (a
    decode step's token is not cached yet), and none before ``starts`` (the first position a
    sliding window lets any query see)."""

    def __init__(self, rng, context_lens, block_size, dtype, spare_blocks=3, cached_lens=None, head_dim=HEAD_DIM,
                 starts=None):
        self.context_lens = np.asarray(context_lens, np.int32)
        self.block_size = block_size
        max_blocks = max(1, -(-int(self.context_lens.max()) // block_size))
        num_blocks = 1 + len(context_lens) * max_blocks + spare_blocks
        shape = (KV_HEADS, num_blocks, block_size, head_dim)
        k, v = (rng.standard_normal(shape, np.float32) for _ in range(2))
        self.block_tables = rng.permutation(np.arange(1, num_blocks))[
            :len(context_lens) * max_blocks].reshape(len(context_lens), max_blocks).astype(np.int32)
        owned = np.zeros((num_blocks, block_size), bool)
        ends = self.context_lens if cached_lens is None else cached_lens
        for row, n, first in zip(self.block_tables, ends, np.zeros_like(ends) if starts is None else starts):
            pos = np.arange(first, n)
            owned[row[pos // block_size], pos % block_size] = True
        self.dtype = dtype
        self.clean = (jnp.asarray(k, dtype), jnp.asarray(v, dtype))
        poison = np.where(owned[None, :, :, None], 0.0, np.nan).astype(np.float32)
        self.poisoned = (jnp.asarray(k + poison, dtype), jnp.asarray(v + poison, dtype))

    def tables(self):
        """(block_tables int32 ``[B, max_blocks]``, context_lens int32 ``[B]``)."""
        return jnp.asarray(self.block_tables), jnp.asarray(self.context_lens)

    def last_slots(self):
        """Each row's slot of position context_len - 1 (a decode step's token); 0 for empty rows."""
        pos = np.maximum(self.context_lens - 1, 0)
        page = self.block_tables[np.arange(len(pos)), pos // self.block_size]
        return jnp.asarray(np.where(self.context_lens > 0, page * self.block_size + pos % self.block_size, 0),
                           jnp.int32)

    def stacked(self, layer: int, layers: int, clean: bool = False):
        """The (poisoned, unless ``clean``) pools as layer ``layer`` of a ``[layers, ...]`` stack
        whose other layers are all NaN: a kernel that reads another layer fails."""
        def stack(pool):
            return jnp.stack([pool if i == layer else jnp.full_like(pool, jnp.nan) for i in range(layers)])
        return tuple(stack(pool) for pool in (self.clean if clean else self.poisoned))


def relative_error(ours, ref) -> float:
    """``|ours - ref| / |ref|`` (Frobenius norms) in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def window_starts(first_query_pos, options):
    """Each row's first position its first query sees under ``options``' sliding window (None
    without one): the pools are poisoned before it."""
    window = options.get('sliding_window')
    return None if window is None else np.maximum(np.asarray(first_query_pos) - window + 1, 0)


def window_lens(block_size, window):
    """Rows of one position, empty, as long as the window, one longer, and several pages longer
    (the tiles before the window are never visited: the pools hold NaN there)."""
    return np.asarray([1, 0, window, window + 1, 4 * block_size + 5], np.int32)


def rope_tables(rng, batch, head_dim=HEAD_DIM):
    """float32 cos/sin ``[batch, head_dim]`` of random angles, halves repeated (HF layout)."""
    angles = rng.uniform(-np.pi, np.pi, (batch, head_dim // 2)).astype(np.float32)
    angles = np.concatenate([angles, angles], axis=-1)
    return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def decode_steps_over_layers(pools, qkv, cos, sin, windows, stack, impl: str):
    """``decode_step_attention`` as the model calls it: the K and V pools ``stack`` (stacked over the
    layers) carried through a jitted ``lax.scan`` whose index is the layer (traced), each layer its
    own ``qkv [layers, B, F]`` and sliding window (``windows`` int32 ``[layers]``), writing the slots
    of ``pools`` (a ``Pools``). Returns ``((k, v), outputs [layers, B, heads, head_dim])``."""
    def step(kv, xs):
        x, layer, window = xs
        out, *kv = decode_step_attention(x, cos, sin, *kv, layer, pools.last_slots(), *pools.tables(), SCALE,
                                         sliding_window=window, impl=impl)
        return tuple(kv), out
    layer_index = jnp.arange(qkv.shape[0], dtype=jnp.int32)
    return jax.jit(lambda kv: jax.lax.scan(step, kv, (qkv, layer_index, windows)))(stack)


def decode_case(seed, block_size, group, context_lens, dtype=jnp.float32, head_dim=HEAD_DIM, **options):
    """Pools, a random query ``[B, KV_HEADS * group, head_dim]`` and the decode attention
    reference's output over the clean pools. ``seed``: an int or a Generator; ``options``: the
    ops' ``sliding_window`` / ``logits_soft_cap``."""
    rng = np.random.default_rng(seed)
    pools = Pools(rng, context_lens, block_size, dtype, head_dim=head_dim,
                  starts=window_starts(np.asarray(context_lens) - 1, options))
    q = jnp.asarray(rng.standard_normal((len(context_lens), KV_HEADS * group, head_dim)), dtype)
    window = options.get('sliding_window')
    window = None if window is None else jnp.int32(window)
    ref = paged_decode_attention_reference(q, *pools.stacked(0, 1, clean=True), jnp.int32(0), *pools.tables(), SCALE,
                                           window, options.get('logits_soft_cap'))
    return pools, q, ref


def assert_matches(ours, ref, dtype, empty):
    """Close to the reference, no NaN, and exact zeros where ``empty`` (rows or tokens with
    nothing to attend to)."""
    ours = np.asarray(ours.astype(jnp.float32))
    assert not np.isnan(ours).any(), 'the kernel read a poisoned slot or left an output unwritten'
    assert relative_error(ours, ref.astype(jnp.float32)) < TOLERANCE[dtype]
    assert (ours[np.asarray(empty)] == 0).all(), 'rows with nothing to attend to must be zeros'


def lower_for_cuda(fn, *args, **jit_options) -> str:
    """``jax.jit(fn, **jit_options)`` lowered for CUDA from shapes ``args``, as StableHLO text; a
    skip where this jaxlib cannot lower for the CUDA platform at all."""
    try:
        return jax.jit(fn, **jit_options).trace(*args).lower(lowering_platforms=('cuda',)).as_text()
    except Exception as e:      # noqa: BLE001 - a jaxlib that cannot lower for CUDA here
        if 'cuda' in str(e).lower() and 'platform' in str(e).lower():
            pytest.skip(f'cannot lower for CUDA on this machine: {type(e).__name__}: {e}')
        raise


def assert_kernels_alone(text: str, launches: int | None = None) -> None:
    """The lowered ``text`` holds kernel launches (custom calls) and free reshapes, nothing else XLA
    must launch; ``launches`` custom calls when given."""
    assert set(re.findall(r'= (stablehlo\.\w+)', text)) == {'stablehlo.custom_call', 'stablehlo.reshape'}
    if launches is not None:
        assert text.count('stablehlo.custom_call') == launches


def compile_for_sm90(monkeypatch, tmp_path, fn, *args) -> tuple[str, dict[str, int]]:
    """``fn``'s Pallas (Triton) kernels lowered for CUDA, then each compiled by Triton to an sm_90
    cubin, without a GPU (JAX's Triton IR taken from its private lowering, as the GPU plugin
    would compile it): the lowered text, and each kernel's shared memory in bytes."""
    triton = pytest.importorskip('triton')
    from triton.backends.compiler import GPUTarget
    lowering = pytest.importorskip('jax._src.pallas.triton.lowering')
    modules, lower = {}, lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = lower(*a, **k)
        text = result.module.operation.get_asm(enable_debug_info=False)
        modules[re.search(r'tt\.func public @(\w+)', text).group(1)] = text
        return result

    monkeypatch.setattr(lowering, 'lower_jaxpr_to_triton_module', capture)
    text = lower_for_cuda(fn, *args)
    if '__gpu$xla.gpu.triton' not in text:
        pytest.skip('this jaxlib compiles its Triton kernels while lowering: the test reads the Triton IR it passes on')
    shared = {}
    for name, stages, warps in re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text):
        path = tmp_path / f'{name}.ttir'
        path.write_text(modules[name])
        compiled = triton.compile(str(path), target=GPUTarget('cuda', 90, 32),
                                  options=dict(num_warps=int(warps), num_stages=int(stages)))
        shared[name] = compiled.metadata.shared
    return text, shared
