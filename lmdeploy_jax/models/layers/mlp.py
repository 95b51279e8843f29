"""The gated MLP of the families: ``down(act(gate(x)) * up(x))`` with gate/up fused (``fused.py``)."""
from __future__ import annotations

import jax
from flax import nnx

from ..spec import ModelSpec
from .activations import ACTIVATIONS
from .fused import split_fused
from .quantized_linear import make_linear, project_columns



class GatedMLP(nnx.Module):
    """``gate_up [layers, 2 * intermediate, hidden]`` and ``down [layers, hidden, intermediate]``,
    biases where ``spec.biases`` names them; the activation is ``spec.hidden_act``."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        L, hidden, inter = spec.num_layers, spec.hidden_size, spec.intermediate_size
        self.gate_up = make_linear(spec, L, 2 * inter, hidden, bias='gate_up' in spec.biases, rngs=rngs)
        self.down = make_linear(spec, L, hidden, inter, bias='down' in spec.biases, rngs=rngs)

    def __call__(self, ctx, index: jax.Array, x: jax.Array) -> jax.Array:
        """Layer ``index``'s MLP of ``x [B, T, hidden]``, its output in ``ctx.row_parallel``'s form
        (``attention.StepContext``)."""
        gate, up = split_fused(project_columns(self.gate_up, x, index, ctx.mesh), ctx.layout, 'gate_up')
        return ctx.row_parallel.project(ACTIVATIONS[ctx.spec.hidden_act](gate) * up, self.down.weights(index))
