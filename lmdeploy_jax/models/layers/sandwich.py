"""The sandwich-norm decoder layer (Gemma 2, Gemma 3, GLM-4): each sublayer's output is RMS-normed
before it joins the residual stream,

    x = x + post_attn_norm(attn(input_norm(x)))
    x = x + post_mlp_norm(mlp(pre_mlp_norm(x)))

A post norm needs the whole sum of a row-parallel projection (o, down) over the devices, so the
layer takes only ``row_parallel.ReducedSums`` (``partial_sums = False``: ``CausalLM`` then asks
``for_step`` for that form at every step size); the layer loop carries each layer's post-normed MLP
output to the next layer's first norm, as ``DecoderLayer`` carries its MLP output.
"""
from __future__ import annotations

import jax
from flax import nnx

from ..spec import ModelSpec
from .attention import KVCache, PagedAttention, StepContext
from .linear import RMSNorm
from .mlp import GatedMLP


class SandwichDecoderLayer(nnx.Module):
    """Stacked ``input_norm``, attention, ``post_attn_norm``, ``pre_mlp_norm``, the gated MLP,
    ``post_mlp_norm`` (each norm ``[layers, hidden]``). Attention rotates by ``ctx.rope(window)``
    (the sliding layers' own rope where the model has one)."""
    partial_sums = False

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        L, hidden = spec.num_layers, spec.hidden_size
        self.input_norm = RMSNorm(L, hidden, spec.dtype)
        self.attn = PagedAttention(spec, rngs=rngs)
        self.post_attn_norm = RMSNorm(L, hidden, spec.dtype)
        self.pre_mlp_norm = RMSNorm(L, hidden, spec.dtype)
        self.mlp = GatedMLP(spec, rngs=rngs)
        self.post_mlp_norm = RMSNorm(L, hidden, spec.dtype)

    def __call__(self, ctx: StepContext, index: jax.Array, x: jax.Array, mlp_out: jax.Array, kv: KVCache,
                 window: jax.Array | None) -> tuple[jax.Array, jax.Array, KVCache]:
        """Layer ``index`` on the residual stream ``x``; ``mlp_out``: the previous layer's post-normed
        MLP output (the first layer's: zeros), added to ``x`` by this layer's first norm. Returns
        ``(x, this layer's post-normed MLP output, kv)``; ``ctx.row_parallel`` is a ``ReducedSums``."""
        sums = ctx.row_parallel
        x, normed = sums.add_norm(x, mlp_out, self.input_norm.weight[...], index)
        h, kv = self.attn(ctx, index, normed, kv, *ctx.rope(window), window)
        h = sums.norm(h, self.post_attn_norm.weight[...], index)
        x, normed = sums.add_norm(x, h, self.pre_mlp_norm.weight[...], index)
        return x, sums.norm(self.mlp(ctx, index, normed), self.post_mlp_norm.weight[...], index), kv
