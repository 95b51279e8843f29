"""A decoder-only causal LM over the paged KV cache, as ``nnx`` modules that families subclass.

Every parameter of the decoder layers is stacked over the layers (``[layers, ...]``) and the
layers run as a loop (``fori_loop``, a scan): a step traces and compiles one layer rather than L,
which keeps start-up short. The KV stacks ride in the loop's carry, so XLA updates them in place;
each layer's KV write, attention and RMSNorms take the loop index and address their layer inside
the stack (slicing a layer out would copy it).

Each RMSNorm is one op together with the residual add before it (``pallas_kernels.rms_norm``): the
loop carries each layer's MLP output to the next layer's first norm, which adds it. The row-parallel
projections (o, down) and the sums over the devices after them take one of two forms, by the
step's size (``row_parallel.py``).

Sliding windows (``spec.sliding_windows``) are per-layer data: the loop reads its layer's window
from an int32 ``[layers]`` array (0: global) and hands it to attention, which masks the keys outside
it; every block of the context stays in the cache.

The engine calls a model through ``nnx.split``/``nnx.merge`` (``loader.LoadedModel``), so a compiled
step takes the parameters as an argument.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ..rope import cos_sin, inv_frequencies
from ..row_parallel import for_step
from ..spec import ModelSpec
from ..step_batch import StepBatch
from .attention import KVCache, PagedAttention, StepContext
from .fused import FusedLayout
from .linear import INIT_STD, Linear, RMSNorm
from .mlp import GatedMLP


@functools.lru_cache(maxsize=None)
def rope_inv_frequencies(spec: ModelSpec) -> np.ndarray:
    """``rope.inv_frequencies`` of ``spec``'s rope and head, computed once per spec."""
    return inv_frequencies(spec.rope, spec.head_dim)


@functools.lru_cache(maxsize=None)
def local_rope_inv_frequencies(spec: ModelSpec) -> np.ndarray:
    """``rope_inv_frequencies`` of ``spec.local_rope`` (the sliding layers' own rope)."""
    return inv_frequencies(spec.local_rope, spec.head_dim)


class DecoderLayer(nnx.Module):
    """The Llama layer, stacked: ``input_norm``, attention, ``post_norm``, the gated MLP. It takes
    either form of the row-parallel sums (``partial_sums``). ``mlp_class``: the MLP, built as
    ``mlp_class(spec, rngs=...)`` and called as ``GatedMLP`` is (a mixture of experts' sets its own)."""
    partial_sums = True
    mlp_class = GatedMLP

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        L, hidden = spec.num_layers, spec.hidden_size
        self.input_norm = RMSNorm(L, hidden, spec.dtype)
        self.attn = PagedAttention(spec, rngs=rngs)
        self.post_norm = RMSNorm(L, hidden, spec.dtype)
        self.mlp = self.mlp_class(spec, rngs=rngs)

    def __call__(self, ctx: StepContext, index: jax.Array, x: jax.Array, mlp_out: jax.Array, kv: KVCache,
                 window: jax.Array | None) -> tuple[jax.Array, jax.Array, KVCache]:
        """Layer ``index`` on the residual stream ``x``; ``mlp_out``: the previous layer's MLP output
        (the first layer's: the embeddings' share), in ``ctx.row_parallel``'s form, added to ``x``
        by this layer's first norm. Returns ``(x, this layer's MLP output, kv)``."""
        add_norm = ctx.row_parallel.add_norm
        x, normed = add_norm(x, mlp_out, self.input_norm.weight[...], index)
        h, kv = self.attn(ctx, index, normed, kv, ctx.cos, ctx.sin, window)
        x, normed = add_norm(x, h, self.post_norm.weight[...], index)
        return x, self.mlp(ctx, index, normed), kv


class CausalLM(nnx.Module):
    """``embed [vocab, hidden]``, the stacked ``layers``, the final ``norm``, and ``lm_head`` unless
    the embeddings are tied. ``spec.num_kv_heads`` counts the KV heads as stored (``loader.py``).
    Families set ``layer_class`` or override the hooks below."""
    layer_class = DecoderLayer

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        self.embed = nnx.Param(nnx.initializers.normal(INIT_STD)(
            rngs.params(), (spec.vocab_size, spec.hidden_size), spec.dtype))
        self.layers = self.layer_class(spec, rngs=rngs)
        self.norm = RMSNorm(None, spec.hidden_size, spec.dtype)
        if not spec.tie_word_embeddings:
            self.lm_head = Linear(None, spec.vocab_size, spec.hidden_size, spec.dtype, bias='lm_head' in spec.biases,
                                  rngs=rngs)

    def __call__(self, kv_caches: KVCache, batch: StepBatch, mesh: Mesh | None = None, unroll: int | bool = 1,
                 p2p_all_reduce: bool = False) -> tuple[jax.Array, KVCache]:
        """Run the decoder over ``batch``; returns the final-normed hidden ``[B, T, hidden]`` and the
        cache. ``mesh``: the tensor-parallel mesh the params and cache are sharded over, if any.
        ``unroll``: layers per loop iteration (``True``: all, as straight-line code).
        ``p2p_all_reduce``: the ``reduce_add_rms_norm`` CUDA kernel is prepared for the mesh's GPUs
        (``row_parallel.py``)."""
        spec = self.spec
        embed = self.embed[...]
        row_parallel = for_step(spec, mesh, batch.token_ids.shape, embed.dtype, p2p_all_reduce,
                                self.layer_class.partial_sums)
        x, mlp_out = self.embed_tokens(row_parallel, embed, batch.token_ids)
        cos, sin = cos_sin(rope_inv_frequencies(spec), batch.positions, spec.rope)
        # spec counts the KV heads as stored, so each shard's parts are plain 1/tp of them
        local = None if spec.local_rope is None else cos_sin(local_rope_inv_frequencies(spec), batch.positions,
                                                             spec.local_rope)
        ctx = StepContext(spec, mesh, row_parallel, FusedLayout(spec, mesh.size if mesh is not None else 1),
                          batch, cos, sin, local)
        # each layer's sliding window (0: global), read by the loop index; None: no layer has one
        windows = jnp.asarray(spec.sliding_windows, jnp.int32) if any(spec.sliding_windows) else None

        def layer_step(index, carry):
            x, mlp_out, kv = carry
            window = None if windows is None else windows[index]
            return self.layers(ctx, index, x, mlp_out, kv, window)

        x, mlp_out, kv_caches = jax.lax.fori_loop(0, spec.num_layers, layer_step, (x, mlp_out, tuple(kv_caches)),
                                                  unroll=unroll)
        return row_parallel.add_norm(x, mlp_out, self.norm.weight[...])[1], kv_caches

    def embed_tokens(self, row_parallel, table: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The token embeddings in ``row_parallel``'s form (``row_parallel.ReducedSums.embed``),
        times ``spec.embed_scale`` in the table's dtype where it is not 1."""
        embedded = row_parallel.embed(table, ids)
        if self.spec.embed_scale == 1.0:
            return embedded
        scale = jnp.asarray(self.spec.embed_scale, table.dtype)
        return tuple(e * scale for e in embedded)

    def token_logits(self, token_ids: jax.Array) -> jax.Array:
        """float32 ``[B, T, vocab]`` at every position of ``token_ids [B, T]``, without the engine
        (``dense_call.token_logits``)."""
        from ..dense_call import token_logits
        return token_logits(self, token_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 ``[..., vocab]`` from ``hidden [..., hidden_size]``, through the tied embedding when
        there is no separate lm_head. The matmul's output has the model's dtype, as in Hugging
        Face's ``lm_head`` (a float32 output would make XLA convert the whole weight to float32 on
        every step); the sampler then works in float32. With ``spec.final_logit_softcap``, the
        logits are soft-capped (in float32)."""
        if self.spec.tie_word_embeddings:
            logits = jnp.einsum('...h,vh->...v', hidden, self.embed[...]).astype(jnp.float32)
        else:
            logits = self.lm_head(hidden).astype(jnp.float32)
        cap = self.spec.final_logit_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)
