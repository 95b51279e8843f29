"""The Hugging Face tensor names of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) and
reading one layer at a time from the memory-mapped safetensors, so a model larger than the
accelerator's memory is quantized layer by layer."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..models.safetensors_file import SafetensorsCheckpoint, read_header
from .decoder_layer import LayerTensors

ARCHITECTURES = ('LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM')

# short name -> tensor name under ``model.layers.{i}.``
LINEARS = {'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj', 'v': 'self_attn.v_proj', 'o': 'self_attn.o_proj',
           'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj', 'down': 'mlp.down_proj'}
NORMS = {'input_norm': 'input_layernorm.weight', 'post_norm': 'post_attention_layernorm.weight'}
REQUIRED = {**NORMS, **{short: f'{name}.weight' for short, name in LINEARS.items()}}
OPTIONAL = {'q_bias': 'self_attn.q_proj.bias', 'k_bias': 'self_attn.k_proj.bias', 'v_bias': 'self_attn.v_proj.bias',
            'q_norm': 'self_attn.q_norm.weight', 'k_norm': 'self_attn.k_norm.weight'}
# the layer tensors an AWQ checkpoint keeps in float
FLOAT_TENSORS = {**NORMS, **OPTIONAL}
EMBED = 'model.embed_tokens.weight'


def layer_prefix(layer: int) -> str:
    return f'model.layers.{layer}.'


def read_layer(ckpt: SafetensorsCheckpoint, layer: int) -> LayerTensors:
    """Layer ``layer``'s tensors as float32 device arrays by short name (``REQUIRED`` always, the
    ``OPTIONAL`` ones the checkpoint has); CheckpointError naming the file when a required one is
    missing."""
    prefix = layer_prefix(layer)
    names = {**REQUIRED, **{short: name for short, name in OPTIONAL.items() if prefix + name in ckpt}}
    return {short: jnp.asarray(np.asarray(ckpt.view(prefix + name), np.float32)) for short, name in names.items()}


def other_tensor_names(ckpt: SafetensorsCheckpoint, num_layers: int) -> list[str]:
    """The checkpoint's tensors outside the decoder layers' (embeddings, final norm, lm_head),
    written through unquantized."""
    layered = tuple(layer_prefix(i) for i in range(num_layers))
    names = {name for path in ckpt.files for name in read_header(path)[0]}
    return sorted(n for n in names if not n.startswith(layered))
