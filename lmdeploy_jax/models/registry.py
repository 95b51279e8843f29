"""Which Hugging Face ``architectures`` the JAX engine runs. All of them share the Llama decoder
(``llama.py``); they differ only in config keys and optional biases, which the loader reads."""
from __future__ import annotations

SUPPORTED_ARCHITECTURES = ('LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM')


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture (or a feature of its config, named in ``detail``) has no JAX
    model; the caller may fall back to PyTorch."""

    def __init__(self, architecture: str, detail: str | None = None):
        self.architecture = architecture
        what = f'architecture {architecture!r}' + (f' with {detail}' if detail else '')
        super().__init__(f'{what} is not supported by the JAX engine '
                         f'(supported: {", ".join(SUPPORTED_ARCHITECTURES)})')


def is_supported(architecture: str) -> bool:
    return architecture in SUPPORTED_ARCHITECTURES
