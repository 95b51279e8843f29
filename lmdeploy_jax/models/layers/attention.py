"""Attention over the paged KV cache, as an ``nnx`` module stacked over the layers.

A decode step (one token per row) hands the fused qkv projection to one op that applies rope,
writes the token's K/V and attends (``decode_step_attention``: on a GPU one kernel, plus one that
combines its sequence splits), since at small batches a step is bound by kernel launches; prefill
splits q/k/v, applies rope in XLA, writes the chunk's K/V, then attends. Over int4 pools queries and
keys are Hadamard-rotated after rope (``kv_rotation.py``), so a decode step ropes them in XLA too.

Given a tensor-parallel mesh, the KV write and attention run under ``shard_map``, each device on its
own heads and pages: XLA cannot partition the Pallas kernels' custom calls, and attention needs no
communication across heads.

A mixed step (``step_batch.MixedBatch``) runs both paths in one layer: its decode segment's tokens
through the decode-step op, its prefill segment's through the prefill path, each on its own rows'
slots, block tables and context lengths.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from pallas_kernels.decode_step_attention.api import decode_step_attention
from pallas_kernels.kv_write.api import write_kv
from pallas_kernels.prefill_attention.api import paged_prefill_attention

from ...parallel import rules
from ..kv_rotation import hadamard_rotate, rotates_keys
from ..rope import apply_rope
from ..row_parallel import PartialSums, ReducedSums, per_device
from ..spec import ModelSpec
from ..step_batch import MixedBatch, StepBatch
from .fused import FusedLayout, join_fused, split_fused
from .linear import RMSNorm, head_rms_norm
from .quantized_linear import make_linear, project_columns

KVCache = tuple[jax.Array, jax.Array]     # K and V stacks [layers, kv_heads, num_blocks, block_size, head_dim]


@dataclass(frozen=True)
class StepContext:
    """What every layer of one traced step shares: the spec, the mesh (None: one device), the form
    of the row-parallel sums (``row_parallel.py``), the fused layout, the batch, and rope's
    ``cos``/``sin [B, T, rotary_dim]``; ``local_cos_sin``: those of ``spec.local_rope`` (the
    sliding-window layers' own rope), None without one."""
    spec: ModelSpec
    mesh: Mesh | None
    row_parallel: ReducedSums | PartialSums
    layout: FusedLayout
    batch: StepBatch
    cos: jax.Array
    sin: jax.Array
    local_cos_sin: tuple[jax.Array, jax.Array] | None = None

    def rope(self, window: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """``(cos, sin)`` of a layer whose sliding window is ``window`` (int32 scalar, 0: global;
        None: the model has no windows): the local tables in a sliding layer of a model with them."""
        if self.local_cos_sin is None or window is None:
            return self.cos, self.sin
        sliding = window > 0
        return tuple(jnp.where(sliding, local, full) for local, full in zip(self.local_cos_sin, (self.cos, self.sin)))


def _prefill_attention(scale: float, soft_cap: float | None, q: jax.Array, k: jax.Array, v: jax.Array,
                       k_pages: jax.Array, v_pages: jax.Array, layer: jax.Array, slots: jax.Array,
                       block_tables: jax.Array, context_lens: jax.Array, query_lens: jax.Array,
                       *window: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Write this step's K/V ``[B * T, kv_heads, head_dim]`` into layer ``layer`` of the stacks,
    attend with ``q [B, T, heads, head_dim]`` over them; ``window``: the layer's sliding window
    (an int32 scalar, 0: none), absent when no layer of the model has one."""
    k_pages, v_pages = write_kv(k_pages, v_pages, k, v, slots, layer)
    out = paged_prefill_attention(q, k_pages, v_pages, block_tables, context_lens, query_lens, scale, layer,
                                  sliding_window=window[0] if window else None, logits_soft_cap=soft_cap)
    return out, k_pages, v_pages


def _decode_step(scale: float, soft_cap: float | None, qkv: jax.Array, cos: jax.Array, sin: jax.Array,
                 k_pages: jax.Array, v_pages: jax.Array, layer: jax.Array, slots: jax.Array, block_tables: jax.Array,
                 context_lens: jax.Array, *window: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row from the fused projection ``qkv [B, F]``: rope, KV write and attention in
    one op; the output as ``[B, T=1, heads, head_dim]``. ``window`` as in ``_prefill_attention``."""
    out, k_pages, v_pages = decode_step_attention(qkv, cos, sin, k_pages, v_pages, layer, slots, block_tables,
                                                  context_lens, scale, sliding_window=window[0] if window else None,
                                                  logits_soft_cap=soft_cap)
    return out[:, None], k_pages, v_pages


class PagedAttention(nnx.Module):
    """q/k/v fused into ``qkv`` (``fused.py``), ``o``, and with ``spec.qk_norm`` per-head
    ``q_norm``/``k_norm [layers, head_dim]`` applied before the rotary embedding (Qwen3, Gemma 3).
    Biases where ``spec.biases`` names them. Scores are scaled by ``spec.attention_scale`` and, with
    ``spec.attn_logit_softcap``, soft-capped."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        L, d, hidden = spec.num_layers, spec.head_dim, spec.hidden_size
        rows = (spec.num_heads + 2 * spec.num_kv_heads) * d
        self.qkv = make_linear(spec, L, rows, hidden, bias='qkv' in spec.biases, rngs=rngs)
        self.o = make_linear(spec, L, hidden, spec.num_heads * d, bias='o' in spec.biases, rngs=rngs)
        if spec.qk_norm:
            self.q_norm = RMSNorm(L, d, spec.dtype)
            self.k_norm = RMSNorm(L, d, spec.dtype)

    def __call__(self, ctx: StepContext, index: jax.Array, x: jax.Array, kv: KVCache, cos: jax.Array,
                 sin: jax.Array, window: jax.Array | None) -> tuple[jax.Array, KVCache]:
        """Project ``x [B, T, hidden]`` of layer ``index``, (q/k-norm,) rotate by ``cos``/``sin``,
        write this step's K/V into the pages, attend over the pages within the layer's ``window``
        (int32 scalar, 0: none; None: the model has no windows). Returns the o projection's output
        in ``ctx.row_parallel``'s form and the cache. A mixed step (``ctx.batch`` a ``MixedBatch``,
        ``x [1, Bd + Bp * T, hidden]``) attends its decode segment as a decode step and its
        prefill segment as a prefill step, then joins their outputs for the o projection."""
        spec, batch = ctx.spec, ctx.batch
        b, t, _ = x.shape
        qkv = project_columns(self.qkv, x, index, ctx.mesh)
        if isinstance(batch, MixedBatch):
            bd, (bp, tp) = batch.decode_tokens, batch.prefill.token_ids.shape
            qkv, cos, sin = qkv[0], cos[0], sin[0]
            decoded, kv = self._decode(ctx, index, qkv[:bd], cos[:bd], sin[:bd], kv, batch.decode, window)
            prefilled, kv = self._prefill(ctx, index, *(a[bd:].reshape(bp, tp, -1) for a in (qkv, cos, sin)), kv,
                                          batch.prefill, window)
            out = jnp.concatenate([decoded.reshape(bd, -1), prefilled.reshape(bp * tp, -1)])
        elif t == 1:
            out, kv = self._decode(ctx, index, qkv[:, 0], cos[:, 0], sin[:, 0], kv, batch, window)
        else:
            out, kv = self._prefill(ctx, index, qkv, cos, sin, kv, batch, window)
        h = ctx.row_parallel.project(out.reshape(b, t, spec.num_heads * spec.head_dim), self.o.weights(index))
        return h, kv

    def _decode(self, ctx: StepContext, index: jax.Array, qkv: jax.Array, cos: jax.Array, sin: jax.Array,
                kv: KVCache, batch: StepBatch, window: jax.Array | None) -> tuple[jax.Array, KVCache]:
        """One token per row of ``batch`` (``[B, 1]``) from the fused projection ``qkv [B, F]``, rotated
        by ``cos``/``sin [B, rotary_dim]``: attention's output ``[B, 1, heads, head_dim]`` and the cache."""
        spec, layout, r = ctx.spec, ctx.layout, rules.REPLICATED
        windowed = () if window is None else (window,)
        if spec.qk_norm:
            qkv = self._norm_fused_qk(spec, layout, index, qkv)
        hadamard = rotates_keys(kv[0])
        if cos.shape[-1] < spec.head_dim or hadamard:
            qkv, cos, sin = _rope_before_the_op(spec, layout, qkv, cos, sin, hadamard)
        attend = per_device(functools.partial(_decode_step, spec.attention_scale, spec.attn_logit_softcap), ctx.mesh,
                            in_specs=(rules.FUSED_OUTPUT, r, r, rules.KV_PAGES, rules.KV_PAGES, r, r, r, r,
                                      *(r for _ in windowed)),
                            out_specs=(rules.Q_HEADS, rules.KV_PAGES, rules.KV_PAGES))
        out, k_pages, v_pages = attend(qkv, cos, sin, *kv, *_paging(index, batch), *windowed)
        return out, (k_pages, v_pages)

    def _prefill(self, ctx: StepContext, index: jax.Array, qkv: jax.Array, cos: jax.Array, sin: jax.Array,
                 kv: KVCache, batch: StepBatch, window: jax.Array | None) -> tuple[jax.Array, KVCache]:
        """The chunks of ``batch`` (``[B, T]``) from the fused projection ``qkv [B, T, F]``, rotated by
        ``cos``/``sin [B, T, rotary_dim]``: attention's output ``[B, T, heads, head_dim]`` and the cache."""
        spec, r = ctx.spec, rules.REPLICATED
        b, t, _ = qkv.shape
        d = spec.head_dim
        windowed = () if window is None else (window,)
        q, k, v = split_fused(qkv, ctx.layout, 'qkv')
        q, k = q.reshape(b, t, spec.num_heads, d), k.reshape(b, t, spec.num_kv_heads, d)
        if spec.qk_norm:
            q, k = self._head_norm(spec, index, q, k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if rotates_keys(kv[0]):
            q, k = hadamard_rotate(q), hadamard_rotate(k)
        k = k.reshape(b * t, spec.num_kv_heads, d)
        v = v.reshape(b * t, spec.num_kv_heads, d)
        attend = per_device(functools.partial(_prefill_attention, spec.attention_scale, spec.attn_logit_softcap),
                            ctx.mesh,
                            in_specs=(rules.Q_HEADS, rules.NEW_KV_HEADS, rules.NEW_KV_HEADS, rules.KV_PAGES,
                                      rules.KV_PAGES, r, r, r, r, r, *(r for _ in windowed)),
                            out_specs=(rules.Q_HEADS, rules.KV_PAGES, rules.KV_PAGES))
        out, k_pages, v_pages = attend(q, k, v, *kv, *_paging(index, batch), batch.query_lens, *windowed)
        return out, (k_pages, v_pages)

    def _head_norm(self, spec: ModelSpec, index: jax.Array, q: jax.Array, k: jax.Array):
        """The q/k norms of layer ``index`` on ``q [..., heads, d]`` and ``k [..., kv_heads, d]``."""
        eps = spec.rms_norm_eps
        return (head_rms_norm(q, self.q_norm.weight[index], eps), head_rms_norm(k, self.k_norm.weight[index], eps))

    def _norm_fused_qk(self, spec: ModelSpec, layout: FusedLayout, index: jax.Array, qkv: jax.Array) -> jax.Array:
        """The q/k norms at decode, on q and k of the fused ``qkv [B, F]`` (the decode-step op then
        rotates them)."""
        b, d = qkv.shape[0], spec.head_dim
        q, k, v = split_fused(qkv, layout, 'qkv')
        q, k = self._head_norm(spec, index, q.reshape(b, spec.num_heads, d), k.reshape(b, spec.num_kv_heads, d))
        return join_fused([q.reshape(b, -1), k.reshape(b, -1), v], layout, 'qkv')


def _paging(index: jax.Array, batch: StepBatch) -> tuple[jax.Array, ...]:
    """The layer index and ``batch``'s KV slots (flat), block tables and context lengths."""
    return index, batch.slot_mapping.reshape(-1), batch.block_tables, batch.context_lens


def _rope_before_the_op(spec: ModelSpec, layout: FusedLayout, qkv: jax.Array, cos: jax.Array, sin: jax.Array,
                        hadamard: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rope at decode outside the decode-step op, for partial rotary dims (the op rotates whole
    heads) and for the Hadamard rotation of int4 pools (``kv_rotation``, which must follow rope):
    q and k of the fused ``qkv [B, F]`` are rotated here by ``cos``/``sin [B, rotary_dim]`` (then,
    with ``hadamard``, by ``hadamard_rotate``), and the op is given tables that leave them as they
    are (cos 1, sin 0: ``x * 1 + r * 0`` is ``x`` exactly)."""
    b, d = qkv.shape[0], spec.head_dim
    q, k, v = split_fused(qkv, layout, 'qkv')
    q = apply_rope(q.reshape(b, spec.num_heads, d), cos, sin)
    k = apply_rope(k.reshape(b, spec.num_kv_heads, d), cos, sin)
    if hadamard:
        q, k = hadamard_rotate(q), hadamard_rotate(k)
    identity = jnp.ones((b, d), jnp.float32), jnp.zeros((b, d), jnp.float32)
    return join_fused([q.reshape(b, -1), k.reshape(b, -1), v], layout, 'qkv'), *identity
