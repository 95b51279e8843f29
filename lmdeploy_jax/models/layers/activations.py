"""The gated MLP's activations by Hugging Face's ``hidden_act`` / ``hidden_activation`` name:
SwiGLU's SiLU and GeGLU's tanh-approximated GELU."""
from __future__ import annotations

import jax


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {'silu': jax.nn.silu, 'swish': jax.nn.silu, 'gelu_pytorch_tanh': _gelu_tanh, 'gelu_new': _gelu_tanh}
