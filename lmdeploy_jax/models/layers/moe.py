"""A mixture-of-experts MLP (Qwen3-MoE, Qwen2-MoE, Mixtral), stacked over the layers.

Each token's router logits ``x @ router.T`` pick its ``experts_per_token`` experts by softmax
probability (in float32, as transformers), optionally renormalized to sum to one; the choices are
sorted by expert so each expert's tokens are consecutive, and each projection is one grouped GEMM
over those ragged groups (``pallas_kernels.grouped_matmul``): expert ``e``'s rows meet only expert
``e``'s weights. The results go back to token order and are summed with the routing weights.

Which path a step takes (``experts_mlp``; static, from the shapes and the backend):

- Where the grouped GEMM runs the Pallas kernel (a GPU), every step takes it: the kernel visits
  only the experts that received rows and reads each of their weight tiles once per tile of rows,
  so a small decode batch reads only the chosen experts' weights.
- Elsewhere (the CPU, or ``LMDEPLOY_JAX_KERNELS=reference``) the grouped GEMM is XLA's
  ``jax.lax.ragged_dot_general``, which XLA may expand into one dense product per group over every
  row: that reads every expert's weights. A step of few choices (a small decode batch) there
  instead gathers each choice's expert weights, so it reads only the chosen experts'
  (``per_choice_mlp``).

Over a mesh every device routes all tokens (the router is replicated) and leaves a share of the
output that the step's row-parallel form sums (``row_parallel.py``), as for a dense MLP's down
projection. The experts split one of two ways (``parallel.rules``):

- tensor parallelism inside each expert (``TurbomindEngineConfig.ep == 1``): each device runs
  its slice of every expert's gate/up rows and down columns for every choice;
- expert parallelism (``ep == tp``, ``ModelSpec.expert_parallel``): each device holds ``E / tp``
  whole experts and runs only the choices of its own (``local_choices``); the others fall past
  the grouped GEMMs' last group, which the Pallas kernel's tile plan gives no work, and carry
  zero weight. The shared expert (Qwen2-MoE) stays split as a dense MLP.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from pallas_kernels.grouped_matmul.api import grouped_matmul, runs_kernel

from ...parallel import rules
from ..spec import ModelSpec
from .activations import ACTIVATIONS
from .decoder import CausalLM, DecoderLayer
from .linear import INIT_STD, Linear, linear


def route(logits: jax.Array, k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """``(weights float32 [N, k], experts int32 [N, k])``: the ``k`` most probable experts of each
    row of ``logits [N, experts]`` by float32 softmax, their probabilities renormalized to sum to 1
    when ``renormalize``."""
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def experts_mlp(x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array, down: jax.Array,
                act, layer: jax.Array | None = None, first_expert: jax.Array | None = None) -> jax.Array:
    """``[N, hidden]``: each token of ``x [N, hidden]`` through its experts ``experts [N, k]``,
    summed with ``weights [N, k]`` (cast to ``x``'s dtype). ``gate_up [E, 2 * inter, hidden]`` (gate
    rows, then up rows), ``down [E, hidden, inter]``: every expert's (or one device's slice of every
    expert's) weights; the expert MLP is ``down(act(gate) * up)``. Both may also be every layer's,
    stacked ``[layers, E, ...]``, with ``layer`` (int32 scalar) the one to use: read in place.
    ``first_expert`` (int32 scalar; expert parallelism): the weights are experts ``[first_expert,
    first_expert + E)`` only, and the result sums only the choices of those (``local_choices``).

    The choices run sorted by expert through grouped GEMMs (``grouped_mlp``), or, where the
    grouped GEMM is not the Pallas kernel and ``gathers_weights`` (a small decode batch), each with
    its own gathered expert weights (``per_choice_mlp``); see the module docstring."""
    n, k = experts.shape
    num_experts = gate_up.shape[-3]
    if first_expert is not None:
        weights, experts = local_choices(weights, experts, first_expert, num_experts)
    gathers = not runs_kernel(x.dtype) and gathers_weights(n * k, num_experts)
    mlp = per_choice_mlp if gathers else grouped_mlp
    y = mlp(x, experts, gate_up, down, act, layer).reshape(n, k, -1)
    return jnp.einsum('nkh,nk->nh', y, weights.astype(x.dtype))


def local_choices(weights: jax.Array, experts: jax.Array, first_expert: jax.Array,
                  num_local: int) -> tuple[jax.Array, jax.Array]:
    """``(weights, experts)`` (both ``[N, k]``, from ``route``) as seen by a device holding experts
    ``[first_expert, first_expert + num_local)``: a choice of one of them keeps its weight and takes
    its local index; any other choice gets weight 0 and index ``num_local``, one past the last
    group, so ``grouped_mlp`` sorts it into the tail that no group covers (no GEMM work; its rows
    come out as zeros) and ``per_choice_mlp`` gathers the last local expert for it, whose result
    the zero weight drops."""
    local = experts - first_expert
    mine = (local >= 0) & (local < num_local)
    return jnp.where(mine, weights, 0), jnp.where(mine, local, num_local)


def gathers_weights(choices: int, num_experts: int) -> bool:
    """Whether ``experts_mlp``, where the grouped GEMM is XLA's ``ragged_dot``, runs a step of
    ``choices`` (tokens times experts per token) by ``per_choice_mlp``: at most a quarter of the
    experts, so that even where XLA writes the gathered weights out as a copy and reads them again,
    the step reads fewer bytes than every expert's. (The Pallas kernel reads only the routed
    experts' weights, so it never needs the gather.)"""
    return 4 * choices <= num_experts


def grouped_mlp(x: jax.Array, experts: jax.Array, gate_up: jax.Array, down: jax.Array, act,
                layer: jax.Array | None = None, impl: str | None = None) -> jax.Array:
    """``[N * k, hidden]``: the expert MLP of each choice (``experts [N, k]`` flattened; weights and
    ``layer`` as in ``experts_mlp``), by grouped GEMMs over the choices sorted by expert
    (``grouped_matmul``, run by ``impl``: see ``pallas_kernels._dispatch``), back in choice order.
    A choice of index ``E`` (past the experts: ``local_choices``) sorts after every group and comes
    out as zeros."""
    k = experts.shape[1]
    choices = experts.reshape(-1)
    order = jnp.argsort(choices, stable=True)                  # the N * k choices, grouped by expert
    group_sizes = jnp.bincount(choices, length=gate_up.shape[-3]).astype(jnp.int32)     # index E: no group
    gate, up = jnp.split(grouped_matmul(x, gate_up, group_sizes, layer, lhs_rows=(order // k).astype(jnp.int32),
                                        transpose_rhs=True, impl=impl), 2, axis=-1)
    return grouped_matmul(act(gate) * up, down, group_sizes, layer, out_rows=order.astype(jnp.int32),
                          transpose_rhs=True, impl=impl)


def per_choice_mlp(x: jax.Array, experts: jax.Array, gate_up: jax.Array, down: jax.Array, act,
                   layer: jax.Array | None = None) -> jax.Array:
    """``grouped_mlp``'s result, each choice's token times its own expert's gathered weights (one
    gather of the layer's chosen experts where the weights are layer-stacked); a choice of index
    ``E`` (``local_choices``) takes the last expert's instead of zeros."""
    choices = jnp.minimum(experts.reshape(-1), gate_up.shape[-3] - 1)
    chosen = (lambda w: w[choices]) if layer is None else (lambda w: w[layer, choices])
    tokens = jnp.repeat(x, experts.shape[1], axis=0)
    gate, up = jnp.split(jnp.einsum('mi,moi->mo', tokens, chosen(gate_up)), 2, axis=-1)
    return jnp.einsum('mi,moi->mo', act(gate) * up, chosen(down))


class Experts(nnx.Module):
    """Every layer's experts: ``gate_up [layers, experts, 2 * inter, hidden]`` (each expert's gate
    and up rows laid out shard by shard, ``fused.py``) and ``down [layers, experts, hidden, inter]``."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        L, E, hidden, inter = spec.num_layers, spec.num_experts, spec.hidden_size, spec.intermediate_size
        init = nnx.initializers.normal(INIT_STD)
        self.gate_up = nnx.Param(init(rngs.params(), (L, E, 2 * inter, hidden), spec.dtype))
        self.down = nnx.Param(init(rngs.params(), (L, E, hidden, inter), spec.dtype))


def _layer(stacked: Linear, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(stacked.w[...], index, keepdims=False)


class MoeMLP(nnx.Module):
    """``router [layers, experts, hidden]``, the ``experts``, and with ``spec.shared_expert_size``
    a shared expert (``shared_gate_up``, ``shared_down``) scaled by ``sigmoid(shared_expert_gate)``
    (``[layers, 1, hidden]``), as Qwen2-MoE. Called as ``GatedMLP``."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        L, hidden, shared = spec.num_layers, spec.hidden_size, spec.shared_expert_size
        self.router = Linear(L, spec.num_experts, hidden, spec.dtype, bias=False, rngs=rngs)
        self.experts = Experts(spec, rngs=rngs)
        if shared:
            self.shared_gate_up = Linear(L, 2 * shared, hidden, spec.dtype, bias=False, rngs=rngs)
            self.shared_down = Linear(L, hidden, shared, spec.dtype, bias=False, rngs=rngs)
            self.shared_expert_gate = Linear(L, 1, hidden, spec.dtype, bias=False, rngs=rngs)

    def __call__(self, ctx, index: jax.Array, x: jax.Array) -> jax.Array:
        """Layer ``index``'s MLP of ``x [B, T, hidden]``, its output in ``ctx.row_parallel``'s form."""
        spec = ctx.spec
        act = ACTIVATIONS[spec.hidden_act]
        r = rules.REPLICATED
        # the experts go in layer-stacked with the layer index (the kernel reads the layer in place)
        args = [x, _layer(self.router, index), index, self.experts.gate_up[...], self.experts.down[...]]
        whole = spec.expert_parallel
        expert_specs = (rules.WHOLE_EXPERTS,) * 2 if whole else (rules.EXPERT_ROWS, rules.EXPERT_COLUMNS)
        in_specs = [r, r, r, *(P(None, *e) for e in expert_specs)]
        if spec.shared_expert_size:
            args += [_layer(p, index) for p in (self.shared_gate_up, self.shared_down, self.shared_expert_gate)]
            in_specs += [rules.COLUMN_WEIGHT, rules.ROW_WEIGHT, r]

        def share(x, router, index, gate_up, down, *shared):
            tokens = x.reshape(-1, x.shape[-1])
            weights, experts = route(linear(tokens, {'w': router}), spec.experts_per_token, spec.norm_topk_prob)
            # expert parallelism: this device's experts are the mesh index's block of E / tp
            first = jax.lax.axis_index(rules.TP) * gate_up.shape[1] if spec.expert_parallel else None
            y = experts_mlp(tokens, weights, experts, gate_up, down, act, index, first)
            if shared:
                shared_gate_up, shared_down, shared_gate = shared
                gate, up = jnp.split(linear(tokens, {'w': shared_gate_up}), 2, axis=-1)
                y = y + jax.nn.sigmoid(linear(tokens, {'w': shared_gate})) * linear(act(gate) * up, {'w': shared_down})
            return y.reshape(x.shape)
        return ctx.row_parallel.sum_of_shares(share, tuple(in_specs), *args)


class MoeDecoderLayer(DecoderLayer):
    """The Llama layer with ``MoeMLP`` in every layer."""
    mlp_class = MoeMLP


class MoeCausalLM(CausalLM):
    layer_class = MoeDecoderLayer
