"""The Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2) as pure functions over a
params pytree (layout in ``weights.py``: layers stacked, q/k/v and gate/up fused) and a paged KV
cache stacked the same way (``kv_cache.py``).

The layers run as a loop (``fori_loop``, a scan): a step traces and compiles one layer rather
than L, which is what keeps start-up short. The KV stacks ride in the loop's carry, so XLA updates
them in place; each layer's KV write, attention and RMSNorms take the loop index and address
their layer inside the stack (slicing a layer out would copy it: on a GPU a small copy per norm
and one for the index itself when it came from a scanned ``arange``).

A decode step (one token per row) hands the fused qkv projection to one op that applies rope,
writes the token's K/V and attends (``decode_step_attention``: on a GPU one kernel, plus one that
combines its sequence splits), since at small batches a step is bound by kernel launches; prefill
splits q/k/v, applies rope in XLA, writes the chunk's K/V, then attends. For the same reason each
RMSNorm is one op together with the residual add before it (``pallas_kernels.rms_norm.add_rms_norm``:
one kernel on a GPU, where XLA launched the add, the mean of squares and the scaling); the loop
carries each layer's MLP output to the next layer's first norm, which adds it.

Sliding windows (``spec.sliding_windows``) are per-layer data: the loop reads its layer's window
from an int32 ``[layers]`` array (0: global) and hands it to the attention ops, which mask the keys
outside it; every block of the context stays in the cache. Qwen3's q/k norms normalize each head
before the rotary embedding.

Given a tensor-parallel mesh, XLA partitions the column-parallel projections from the params'
shardings, and the KV write and attention run under ``shard_map``, each device on its own heads and
pages: XLA cannot partition the Pallas kernels' custom calls, and attention needs no communication
across heads. The row-parallel projections (o, down) and the sums over the devices after them take
one of two forms, by the step's size (``row_parallel.py``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pallas_kernels.decode_step_attention.api import decode_step_attention
from pallas_kernels.kv_write.api import write_kv
from pallas_kernels.prefill_attention.api import paged_prefill_attention

from ..parallel import rules
from .linear import linear
from .rope import apply_rope, cos_sin
from .row_parallel import PartialSums, ReducedSums, for_step, per_device
from .spec import ModelSpec
from .step_batch import StepBatch
from .weights import NORMS, FusedLayout

KVCache = tuple[jax.Array, jax.Array]     # K and V stacks [layers, kv_heads, num_blocks, block_size, head_dim]


def _prefill_attention(scale: float, q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array,
                       v_pages: jax.Array, layer: jax.Array, slots: jax.Array, block_tables: jax.Array,
                       context_lens: jax.Array, query_lens: jax.Array,
                       *window: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Write this step's K/V ``[B * T, kv_heads, head_dim]`` into layer ``layer`` of the stacks,
    attend with ``q [B, T, heads, head_dim]`` over them; ``window``: the layer's sliding window
    (an int32 scalar, 0: none), absent when no layer of the model has one."""
    k_pages, v_pages = write_kv(k_pages, v_pages, k, v, slots, layer)
    out = paged_prefill_attention(q, k_pages, v_pages, block_tables, context_lens, query_lens, scale, layer,
                                  sliding_window=window[0] if window else None)
    return out, k_pages, v_pages


def _decode_step(scale: float, qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_pages: jax.Array,
                 v_pages: jax.Array, layer: jax.Array, slots: jax.Array, block_tables: jax.Array,
                 context_lens: jax.Array, *window: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row from the fused projection ``qkv [B, F]``: rope, KV write and attention in
    one op; the output as ``[B, T=1, heads, head_dim]``. ``window`` as in ``_prefill_attention``."""
    out, k_pages, v_pages = decode_step_attention(qkv, cos, sin, k_pages, v_pages, layer, slots, block_tables,
                                                  context_lens, scale, sliding_window=window[0] if window else None)
    return out[:, None], k_pages, v_pages


def split_fused(y: jax.Array, layout: FusedLayout, key: str) -> list[jax.Array]:
    """Undo the shard-by-shard row grouping (``weights.FusedLayout``) of the fused projection
    ``key``'s output ``[..., tp * sum(sizes)]``: one ``[..., tp * size]`` per part (shard 0's piece
    first), so heads keep their global order."""
    sizes = layout.shard_sizes(key)
    grouped = y.reshape(*y.shape[:-1], layout.tp, sum(sizes))
    pieces = jnp.split(grouped, np.cumsum(sizes)[:-1].tolist(), axis=-1)
    return [p.reshape(*y.shape[:-1], -1) for p in pieces]


def _attention(spec: ModelSpec, mesh: Mesh | None, row_parallel: ReducedSums | PartialSums,
               layout: FusedLayout, layer: dict, index: jax.Array, x: jax.Array, kv: KVCache, batch: StepBatch,
               cos: jax.Array, sin: jax.Array, window: jax.Array | None):
    """Project, (q/k-norm,) rotate, write this step's K/V into the pages, attend over the pages
    within the layer's ``window`` (int32 scalar, 0: none; None: the model has no windows)."""
    b, t, _ = x.shape
    d = spec.head_dim
    qkv = linear(x, layer['qkv'])
    r = rules.REPLICATED
    paging = (index, batch.slot_mapping.reshape(-1), batch.block_tables, batch.context_lens)
    windowed = () if window is None else (window,)
    if t == 1:
        qkv, cos, sin = qkv[:, 0], cos[:, 0], sin[:, 0]
        if spec.qk_norm:
            qkv = _norm_fused_qk(spec, layout, layer, qkv)
        if cos.shape[-1] < d:
            qkv, cos, sin = _rotate_partial(spec, layout, qkv, cos, sin)
        attend = per_device(functools.partial(_decode_step, d ** -0.5), mesh,
                            in_specs=(rules.FUSED_OUTPUT, r, r, rules.KV_PAGES, rules.KV_PAGES, r, r, r, r,
                                      *(r for _ in windowed)),
                            out_specs=(rules.Q_HEADS, rules.KV_PAGES, rules.KV_PAGES))
        out, k_pages, v_pages = attend(qkv, cos, sin, *kv, *paging, *windowed)
    else:
        q, k, v = split_fused(qkv, layout, 'qkv')
        q, k = q.reshape(b, t, spec.num_heads, d), k.reshape(b, t, spec.num_kv_heads, d)
        if spec.qk_norm:
            eps = spec.rms_norm_eps
            q, k = head_rms_norm(q, layer['q_norm'], eps), head_rms_norm(k, layer['k_norm'], eps)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin).reshape(b * t, spec.num_kv_heads, d)
        v = v.reshape(b * t, spec.num_kv_heads, d)
        attend = per_device(functools.partial(_prefill_attention, d ** -0.5), mesh,
                            in_specs=(rules.Q_HEADS, rules.NEW_KV_HEADS, rules.NEW_KV_HEADS, rules.KV_PAGES,
                                      rules.KV_PAGES, r, r, r, r, r, *(r for _ in windowed)),
                            out_specs=(rules.Q_HEADS, rules.KV_PAGES, rules.KV_PAGES))
        out, k_pages, v_pages = attend(q, k, v, *kv, *paging, batch.query_lens, *windowed)
    return row_parallel.project(out.reshape(b, t, spec.num_heads * d), layer['o']), (k_pages, v_pages)


def head_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm of each head ``x [..., head_dim]`` with ``weight [head_dim]``, as Qwen3's q/k norms:
    the statistics in float32, the normalized heads cast back to ``x``'s dtype before the weight."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight * normed.astype(x.dtype)).astype(x.dtype)


def _norm_fused_qk(spec: ModelSpec, layout: FusedLayout, layer: dict, qkv: jax.Array) -> jax.Array:
    """The q/k norms at decode, on q and k of the fused ``qkv [B, F]`` (the decode-step op then
    rotates them)."""
    b, d = qkv.shape[0], spec.head_dim
    q, k, v = split_fused(qkv, layout, 'qkv')
    q = head_rms_norm(q.reshape(b, spec.num_heads, d), layer['q_norm'], spec.rms_norm_eps).reshape(b, -1)
    k = head_rms_norm(k.reshape(b, spec.num_kv_heads, d), layer['k_norm'], spec.rms_norm_eps).reshape(b, -1)
    return join_fused([q, k, v], layout, 'qkv')


def _rotate_partial(spec: ModelSpec, layout: FusedLayout, qkv: jax.Array, cos: jax.Array,
                    sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Partial rotary dims at decode: the decode-step op rotates whole heads, so q and k of the
    fused ``qkv [B, F]`` are rotated here by ``cos``/``sin [B, rotary_dim]``, and the op is given
    tables that leave them as they are (cos 1, sin 0: ``x * 1 + r * 0`` is ``x`` exactly)."""
    b, d = qkv.shape[0], spec.head_dim
    q, k, v = split_fused(qkv, layout, 'qkv')
    q = apply_rope(q.reshape(b, spec.num_heads, d), cos, sin).reshape(b, -1)
    k = apply_rope(k.reshape(b, spec.num_kv_heads, d), cos, sin).reshape(b, -1)
    identity = jnp.ones((b, d), jnp.float32), jnp.zeros((b, d), jnp.float32)
    return join_fused([q, k, v], layout, 'qkv'), *identity


def join_fused(parts: list[jax.Array], layout: FusedLayout, key: str) -> jax.Array:
    """``split_fused``'s inverse: the parts ``[..., tp * size]`` back in the shard-by-shard layout."""
    grouped = [p.reshape(*p.shape[:-1], layout.tp, -1) for p in parts]
    joined = jnp.concatenate(grouped, axis=-1)
    return joined.reshape(*joined.shape[:-2], -1)


def _mlp(row_parallel: ReducedSums | PartialSums, layout: FusedLayout, layer: dict,
         x: jax.Array) -> jax.Array:
    gate, up = split_fused(linear(x, layer['gate_up']), layout, 'gate_up')
    return row_parallel.project(jax.nn.silu(gate) * up, layer['down'])


def forward(spec: ModelSpec, inv_freq: np.ndarray, params: dict, kv_caches: KVCache,
            batch: StepBatch, mesh: Mesh | None = None, unroll: int | bool = 1,
            p2p_all_reduce: bool = False) -> tuple[jax.Array, KVCache]:
    """Run the decoder over ``batch``; returns final-normed hidden ``[B, T, hidden]`` and the cache.
    ``mesh``: the tensor-parallel mesh the params and cache are sharded over, if any. ``unroll``:
    layers per scan iteration (``True``: all, as straight-line code). ``p2p_all_reduce``: the
    ``reduce_add_rms_norm`` CUDA kernel is prepared for the mesh's GPUs (``row_parallel.py``)."""
    row_parallel = for_step(spec, mesh, batch.token_ids.shape, params['embed'].dtype, p2p_all_reduce)
    x, mlp_out = row_parallel.embed(params['embed'], batch.token_ids)
    cos, sin = cos_sin(inv_freq, batch.positions, spec.rope)
    # spec counts the KV heads as stored, so each shard's parts are plain 1/tp of them
    layout = FusedLayout(spec, mesh.size if mesh is not None else 1)

    layers = params['layers']
    # each layer's sliding window (0: global), read by the loop index; None: no layer has one
    windows = jnp.asarray(spec.sliding_windows, jnp.int32) if any(spec.sliding_windows) else None

    def layer_step(index, carry):
        # ``mlp_out``: the previous layer's MLP output (the first layer's: the embeddings' share),
        # in ``row_parallel``'s form, added to the residual stream by this layer's first norm (and
        # the last layer's by the final norm)
        x, mlp_out, kv = carry
        layer = _projections(layers, index)
        x, normed = row_parallel.add_norm(x, mlp_out, layers['input_norm'], index)
        window = None if windows is None else windows[index]
        h, kv = _attention(spec, mesh, row_parallel, layout, layer, index, normed, kv, batch, cos, sin, window)
        x, normed = row_parallel.add_norm(x, h, layers['post_norm'], index)
        return x, _mlp(row_parallel, layout, layer, normed), kv

    x, mlp_out, kv_caches = jax.lax.fori_loop(0, spec.num_layers, layer_step, (x, mlp_out, tuple(kv_caches)),
                                              unroll=unroll)
    return row_parallel.add_norm(x, mlp_out, params['norm'])[1], kv_caches


def _projections(layers: dict, index: jax.Array) -> dict:
    """Layer ``index``'s projection weights, sliced out of their stacks (XLA's cuBLAS calls read
    such a slice in place); the norms are not sliced: their kernel reads its row of the stack."""
    return {key: jax.tree.map(lambda stack: jax.lax.dynamic_index_in_dim(stack, index, keepdims=False), value)
            for key, value in layers.items() if key not in NORMS}


def compute_logits(params: dict, hidden: jax.Array) -> jax.Array:
    """float32 ``[..., vocab]`` from ``hidden [..., hidden_size]``, through the tied embedding when
    the checkpoint has no separate lm_head. The matmul's output has the model's dtype, as in
    Hugging Face's ``lm_head`` (a float32 output made XLA convert the 1 GB weight to float32 on
    every step); the sampler then works in float32."""
    w = params['lm_head']['w'] if 'lm_head' in params else params['embed']
    return jnp.einsum('...h,vh->...v', hidden, w).astype(jnp.float32)
