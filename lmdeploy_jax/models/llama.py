"""The Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, SmolLM2) as pure functions over a
params pytree and a paged KV cache.

Params layout (HF weight orientation, ``[out, in]``; a ``'b'`` entry only where the checkpoint has
a bias, e.g. Qwen2's q/k/v)::

    {'embed': [vocab, hidden], 'norm': [hidden], 'lm_head': {'w': [vocab, hidden]} (untied only),
     'layers': [{'input_norm', 'post_norm': [hidden],
                 'q', 'k', 'v', 'o', 'gate', 'up', 'down': {'w': [out, in], 'b'?: [out]}}, ...]}

Layers are unrolled in Python, each over its own params and KV buffers, so the donated cache is
updated in place (a ``lax.scan`` carrying the cache copies it every step).

Given a tensor-parallel mesh, XLA partitions the projections from the params' shardings, and the
KV write and attention run under ``shard_map``, each device on its own heads and pages: XLA cannot
partition the Pallas kernels' custom calls, and attention needs no communication across heads.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pallas_kernels.kv_write.api import write_kv
from pallas_kernels.paged_attention.api import paged_decode_attention
from pallas_kernels.prefill_attention.api import paged_prefill_attention

from ..parallel import rules
from .rope import apply_rope, cos_sin
from .spec import ModelSpec
from .step_batch import StepBatch

KVCache = list[tuple[jax.Array, jax.Array]]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Normalize in float32, cast back, then scale (the order Hugging Face uses)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def linear(x: jax.Array, p: dict) -> jax.Array:
    y = jnp.einsum('...i,oi->...o', x, p['w'])
    return y + p['b'] if 'b' in p else y


def _paged_attention(scale: float, q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array,
                     v_pages: jax.Array, slots: jax.Array, block_tables: jax.Array, context_lens: jax.Array,
                     query_lens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Write this step's K/V ``[B * T, kv_heads, head_dim]`` into the pages, attend with
    ``q [B, T, heads, head_dim]`` over them; the decode op when T == 1."""
    k_pages, v_pages = write_kv(k_pages, v_pages, k, v, slots)
    if q.shape[1] == 1:
        out = paged_decode_attention(q[:, 0], k_pages, v_pages, block_tables, context_lens, scale)[:, None]
    else:
        out = paged_prefill_attention(q, k_pages, v_pages, block_tables, context_lens, query_lens, scale)
    return out, k_pages, v_pages


def _attention(spec: ModelSpec, mesh: Mesh | None, layer: dict, x: jax.Array, kv: tuple[jax.Array, jax.Array],
               batch: StepBatch, cos: jax.Array, sin: jax.Array):
    """Project, rotate, write this step's K/V into the pages, attend over the pages."""
    b, t, _ = x.shape
    q = linear(x, layer['q']).reshape(b, t, spec.num_heads, spec.head_dim)
    k = linear(x, layer['k']).reshape(b, t, spec.num_kv_heads, spec.head_dim)
    v = linear(x, layer['v']).reshape(b * t, spec.num_kv_heads, spec.head_dim)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin).reshape(b * t, spec.num_kv_heads, spec.head_dim)
    attend = functools.partial(_paged_attention, spec.head_dim ** -0.5)
    if mesh is not None:
        r = rules.REPLICATED
        attend = jax.shard_map(
            attend, mesh=mesh, check_vma=False,
            in_specs=(rules.Q_HEADS, rules.NEW_KV_HEADS, rules.NEW_KV_HEADS, rules.KV_PAGES, rules.KV_PAGES,
                      r, r, r, r),
            out_specs=(rules.Q_HEADS, rules.KV_PAGES, rules.KV_PAGES))
    out, k_pages, v_pages = attend(q, k, v, *kv, batch.slot_mapping.reshape(-1), batch.block_tables,
                                   batch.context_lens, batch.query_lens)
    return linear(out.reshape(b, t, spec.num_heads * spec.head_dim), layer['o']), (k_pages, v_pages)


def _mlp(layer: dict, x: jax.Array) -> jax.Array:
    return linear(jax.nn.silu(linear(x, layer['gate'])) * linear(x, layer['up']), layer['down'])


def forward(spec: ModelSpec, inv_freq: np.ndarray, params: dict, kv_caches: KVCache,
            batch: StepBatch, mesh: Mesh | None = None) -> tuple[jax.Array, KVCache]:
    """Run the decoder over ``batch``; returns final-normed hidden ``[B, T, hidden]`` and the cache.
    ``mesh``: the tensor-parallel mesh the params and cache are sharded over, if any."""
    x = params['embed'][batch.token_ids]
    cos, sin = cos_sin(inv_freq, batch.positions)
    new_caches = []
    for layer, kv in zip(params['layers'], kv_caches, strict=True):
        h, kv = _attention(spec, mesh, layer, rms_norm(x, layer['input_norm'], spec.rms_norm_eps),
                           kv, batch, cos, sin)
        x = x + h
        x = x + _mlp(layer, rms_norm(x, layer['post_norm'], spec.rms_norm_eps))
        new_caches.append(kv)
    return rms_norm(x, params['norm'], spec.rms_norm_eps), new_caches


def compute_logits(params: dict, hidden: jax.Array) -> jax.Array:
    """float32 ``[..., vocab]`` from ``hidden [..., hidden_size]``, through the tied embedding when
    the checkpoint has no separate lm_head."""
    w = params['lm_head']['w'] if 'lm_head' in params else params['embed']
    return jnp.einsum('...h,vh->...v', hidden, w, preferred_element_type=jnp.float32)
