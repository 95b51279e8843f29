"""Which Hugging Face ``architectures`` the JAX engine runs: each maps to the module under
``families/`` that defines it, imported only when a checkpoint of it is loaded."""
from __future__ import annotations

import importlib

# architecture -> module of lmdeploy_jax.models.families whose FAMILIES defines it
ARCHITECTURES = {
    'LlamaForCausalLM': 'llama',
    'MistralForCausalLM': 'llama',
    'Qwen2ForCausalLM': 'llama',
    'Qwen3ForCausalLM': 'llama',
    'Gemma2ForCausalLM': 'gemma',
    'Gemma3ForCausalLM': 'gemma',
    'Glm4ForCausalLM': 'glm4',
    'InternLM2ForCausalLM': 'internlm2',
    'InternLM3ForCausalLM': 'internlm2',
    'Phi3ForCausalLM': 'phi3',
    'Qwen3MoeForCausalLM': 'moe',
    'Qwen2MoeForCausalLM': 'moe',
    'MixtralForCausalLM': 'moe',
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture (or a feature of its config, named in ``detail``) has no JAX
    model; the caller may fall back to PyTorch."""

    def __init__(self, architecture: str, detail: str | None = None):
        self.architecture = architecture
        what = f'architecture {architecture!r}' + (f' with {detail}' if detail else '')
        super().__init__(f'{what} is not supported by the JAX engine '
                         f'(supported: {", ".join(SUPPORTED_ARCHITECTURES)})')


def is_supported(architecture: str) -> bool:
    return architecture in ARCHITECTURES


def family(architecture: str):
    """The ``family.Family`` of ``architecture``; UnsupportedArchitectureError if none."""
    if architecture not in ARCHITECTURES:
        raise UnsupportedArchitectureError(architecture)
    module = importlib.import_module(f'{__package__}.families.{ARCHITECTURES[architecture]}')
    return module.FAMILIES[architecture]
