"""Which Hugging Face ``architectures`` the JAX engine runs: each maps to the module under
``families/`` that defines it, imported only when a checkpoint of it is loaded."""
from __future__ import annotations

import importlib

from ..checkpoint.quantization import (JAX_METHODS, UnsupportedQuantizationError, WeightQuantization,
                                       quantization_method, weight_quantization)

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
MIXTURE_OF_EXPERTS_MODULE = 'moe'      # the families whose MLPs are experts (``layers.moe``)


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


def checkpoint_quantization(architecture: str, config_path: str, config: dict) -> WeightQuantization | None:
    """The 4-bit weights the JAX engine loads from a checkpoint of ``architecture`` (its config.json
    at ``config_path``, read as ``config``); None when it is not quantized.

    ``checkpoint.quantization.weight_quantization``'s refusals, and before them an AWQ or GPTQ
    mixture of experts (Qwen3-MoE, Qwen2-MoE, Mixtral): UnsupportedQuantizationError naming the
    method, the architecture and ``model_format``, since the experts are stacked float weights
    (``weight_map.Experts``) that no 4-bit grouped GEMM runs. Reads config.json only."""
    method = quantization_method(config_path, config)
    if method in JAX_METHODS and ARCHITECTURES.get(architecture) == MIXTURE_OF_EXPERTS_MODULE:
        raise UnsupportedQuantizationError(
            config_path, method, f'4-bit ({method}) weights for mixture-of-experts layers are not supported by the '
                                 f"JAX engine (architecture {architecture}, model_format={method!r}): its experts "
                                 'run from float weights only; use the unquantized (float16, bfloat16 or float32) '
                                 'checkpoint')
    return weight_quantization(config_path, config)
