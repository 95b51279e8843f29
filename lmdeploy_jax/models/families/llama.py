"""The Llama decoder and the families that are Llama with a twist: Llama 2/3/3.1/3.2 (tied
embeddings in 3.2's small models), Mistral (a sliding window in every layer), Qwen2/2.5 (q/k/v
biases, per-layer sliding windows), Qwen3 (per-head q/k norms), SmolLM2. Biases are read wherever
the checkpoint has them."""
from __future__ import annotations

from ..family import Family
from ..layers.decoder import CausalLM
from ..spec import ModelSpec
from ..weight_map import Path, Source, Tensor, linear

LAYER = 'model.layers.{i}.'


def weight_map(spec: ModelSpec) -> dict[Path, Source]:
    """Hugging Face's Llama names (``model.layers.{i}.self_attn.q_proj`` ...)."""
    attn = LAYER + 'self_attn.'
    return {
        ('embed',): Tensor('model.embed_tokens.weight'),
        ('norm', 'weight'): Tensor('model.norm.weight'),
        **linear(('lm_head',), 'lm_head'),
        ('layers', 'input_norm', 'weight'): Tensor(LAYER + 'input_layernorm.weight'),
        ('layers', 'post_norm', 'weight'): Tensor(LAYER + 'post_attention_layernorm.weight'),
        ('layers', 'attn', 'q_norm', 'weight'): Tensor(attn + 'q_norm.weight'),
        ('layers', 'attn', 'k_norm', 'weight'): Tensor(attn + 'k_norm.weight'),
        **linear(('layers', 'attn', 'qkv'), (attn + 'q_proj', attn + 'k_proj', attn + 'v_proj')),
        **linear(('layers', 'attn', 'o'), attn + 'o_proj'),
        **linear(('layers', 'mlp', 'gate_up'), (LAYER + 'mlp.gate_proj', LAYER + 'mlp.up_proj')),
        **linear(('layers', 'mlp', 'down'), LAYER + 'mlp.down_proj'),
    }


FAMILIES = {
    'LlamaForCausalLM': Family(CausalLM, weight_map),
    'MistralForCausalLM': Family(CausalLM, weight_map, sliding_window='all_layers'),
    'Qwen2ForCausalLM': Family(CausalLM, weight_map, sliding_window='per_layer'),
    'Qwen3ForCausalLM': Family(CausalLM, weight_map, sliding_window='per_layer', qk_norm=True),
}
