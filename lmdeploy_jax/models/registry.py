"""Which Hugging Face ``architectures`` the JAX engine runs, and what sets each family apart. All of
them share the Llama decoder (``llama.py``); they differ in config keys, optional biases (read from
the checkpoint), sliding windows and q/k norms (read from ``FAMILIES``)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What an architecture adds to the Llama decoder, as its transformers model does.

    ``sliding_window``: how config.json gives the attention windows (``spec.sliding_windows``):
    None (no window), ``'all_layers'`` (Mistral: ``sliding_window`` in every layer, ``layer_types``
    ignored) or ``'per_layer'`` (Qwen2, Qwen3: ``sliding_window`` when ``use_sliding_window``, in the
    layers ``layer_types`` marks ``sliding_attention``, by default those from ``max_window_layers``
    on). ``qk_norm``: q and k are RMS-normed per head before the rotary embedding (Qwen3's
    ``q_norm``/``k_norm``)."""
    sliding_window: str | None = None
    qk_norm: bool = False


FAMILIES = {
    'LlamaForCausalLM': Family(),
    'MistralForCausalLM': Family(sliding_window='all_layers'),
    'Qwen2ForCausalLM': Family(sliding_window='per_layer'),
    'Qwen3ForCausalLM': Family(sliding_window='per_layer', qk_norm=True),
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture (or a feature of its config, named in ``detail``) has no JAX
    model; the caller may fall back to PyTorch."""

    def __init__(self, architecture: str, detail: str | None = None):
        self.architecture = architecture
        what = f'architecture {architecture!r}' + (f' with {detail}' if detail else '')
        super().__init__(f'{what} is not supported by the JAX engine '
                         f'(supported: {", ".join(SUPPORTED_ARCHITECTURES)})')


def is_supported(architecture: str) -> bool:
    return architecture in FAMILIES
