"""One Llama-family decoder layer in float32 JAX, split where AWQ reads it: the inputs of its
linear groups (after the input norm, of ``o_proj``, after the post-attention norm, of
``down_proj``) and the blocks whose output error the scale search measures (the attention, the
MLP, and ``o_proj`` / ``down_proj`` alone), as in AutoAWQ's and LMDeploy's ``auto_scale_block``.

A layer's tensors are a ``LayerTensors`` dict of float32 arrays by short name: ``input_norm``,
``post_norm`` ``[hidden]``; ``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down`` (Hugging Face
``[out, in]`` matrices); optional ``q_bias``, ``k_bias``, ``v_bias`` (Qwen2) and ``q_norm``,
``k_norm`` ``[head_dim]`` (Qwen3); plus ``window``, an int32 scalar (the layer's sliding window,
0 for none). Activations are ``[batch, seq, width]``; every sequence starts at position 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.rope import apply_rope

from ..models.layers.activations import ACTIVATIONS
from ..models.rope import cos_sin, inv_frequencies
from ..models.spec import ModelSpec

LayerTensors = dict


# each linear group: (its linears, the activation whose per-channel statistics scale it)
GROUPS = {'qkv': (('q', 'k', 'v'), 'attn_in'), 'o': (('o',), 'o_in'), 'gate_up': (('gate', 'up'), 'mlp_in'),
          'down': (('down',), 'down_in')}
# the input each group's search block reads (down_proj's is recomputed from the normed MLP input)
SEARCH_INPUTS = {'qkv': 'attn_in', 'o': 'o_in', 'gate_up': 'mlp_in', 'down': 'mlp_in'}


@dataclass(frozen=True)
class LayerPass:
    """One batch through a layer: ``out`` (the next layer's input), ``inputs`` (``attn_in``,
    ``o_in``, ``mlp_in``: the activations the search blocks read), and per group of ``GROUPS``
    ``abs_sum`` and ``abs_max`` ``[in]``, the sum and max over the batch's tokens of ``|x|``
    of the group's input."""
    out: jax.Array
    inputs: dict
    abs_sum: dict
    abs_max: dict


class DecoderLayer:
    """The float computations of ``spec``'s decoder layers on sequences of ``seqlen`` tokens:
    ``forward(tensors, h)`` is a jitted ``LayerPass`` of the layer input ``h``; the
    block methods have the ``scale_search.Block`` signature ``(weights, tensors, x)``, the linears
    being scaled passed apart from the layer's other tensors."""

    def __init__(self, spec: ModelSpec, seqlen: int):
        self.spec = spec
        self.act = ACTIVATIONS[spec.hidden_act]
        self.cos, self.sin = cos_sin(inv_frequencies(spec.rope, spec.head_dim),
                                     jnp.arange(seqlen, dtype=jnp.int32)[None], spec.rope)
        self.forward = jax.jit(self._forward)

    def rms_norm(self, x: jax.Array, weight: jax.Array) -> jax.Array:
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(variance + self.spec.rms_norm_eps) * weight

    def attention(self, q_w: jax.Array, k_w: jax.Array, v_w: jax.Array, t: LayerTensors, x: jax.Array) -> jax.Array:
        """The attention's output before ``o_proj`` ``[batch, seq, heads * head_dim]`` for the
        normed input ``x``: causal (and windowed where ``t['window']`` > 0), grouped-query."""
        spec = self.spec
        batch, seq, _ = x.shape

        def project(w, name, heads):
            y = x @ w.T
            if f'{name}_bias' in t:
                y = y + t[f'{name}_bias']
            y = y.reshape(batch, seq, heads, spec.head_dim)
            return self.rms_norm(y, t[f'{name}_norm']) if f'{name}_norm' in t else y

        q = apply_rope(project(q_w, 'q', spec.num_heads), self.cos, self.sin)
        k = apply_rope(project(k_w, 'k', spec.num_kv_heads), self.cos, self.sin)
        v = project(v_w, 'v', spec.num_kv_heads)
        group = spec.num_heads // spec.num_kv_heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) * spec.attention_scale
        pos = jnp.arange(seq)
        window = t['window']
        visible = (pos[None, :] <= pos[:, None]) & ((window == 0) | (pos[None, :] > pos[:, None] - window))
        probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
        return jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(batch, seq, spec.num_heads * spec.head_dim)

    def gated(self, gate_w: jax.Array, up_w: jax.Array, x: jax.Array) -> jax.Array:
        """The input of ``down_proj``: ``act(x @ gate.T) * (x @ up.T)``."""
        return self.act(x @ gate_w.T) * (x @ up_w.T)

    # the blocks the scale search measures: (the linears being scaled, the layer's tensors, input)
    def qkv_block(self, weights: list, t: LayerTensors, x: jax.Array) -> jax.Array:
        return self.attention(*weights, t, x) @ t['o'].T

    def gate_up_block(self, weights: list, t: LayerTensors, x: jax.Array) -> jax.Array:
        return self.gated(*weights, x) @ t['down'].T

    def down_input(self, t: LayerTensors, x: jax.Array) -> jax.Array:
        """down_proj's input from the normed MLP input ``x`` (a ``RatioSearch`` feed: only
        hidden-wide activations are kept between the forward and the search)."""
        return self.gated(t['gate'], t['up'], x)

    @staticmethod
    def linear_block(weights: list, t: LayerTensors, x: jax.Array) -> jax.Array:
        return x @ weights[0].T

    def _forward(self, t: LayerTensors, h: jax.Array) -> LayerPass:
        attn_in = self.rms_norm(h, t['input_norm'])
        o_in = self.attention(t['q'], t['k'], t['v'], t, attn_in)
        h = h + o_in @ t['o'].T
        mlp_in = self.rms_norm(h, t['post_norm'])
        down_in = self.gated(t['gate'], t['up'], mlp_in)
        acts = {'attn_in': attn_in, 'o_in': o_in, 'mlp_in': mlp_in, 'down_in': down_in}
        flat = {group: jnp.abs(acts[name]).reshape(-1, acts[name].shape[-1]) for group, (_, name) in GROUPS.items()}
        return LayerPass(h + down_in @ t['down'].T, {k: acts[k] for k in ('attn_in', 'o_in', 'mlp_in')},
                         {g: a.sum(0) for g, a in flat.items()}, {g: a.max(0) for g, a in flat.items()})


jax.tree_util.register_dataclass(LayerPass, data_fields=['out', 'inputs', 'abs_sum', 'abs_max'], meta_fields=[])


def window_tensor(spec: ModelSpec, layer: int) -> np.ndarray:
    """int32 scalar: layer ``layer``'s sliding window (0: attends to every earlier token)."""
    return np.int32(spec.sliding_windows[layer] if spec.sliding_windows else 0)
