"""The mixtures of experts (``layers.moe``): Qwen3-MoE (q/k norms, ``norm_topk_prob``), Qwen2-MoE
(q/k/v biases, a shared expert behind a sigmoid gate) and Mixtral (Mistral's sliding window,
renormalized top-k). Their checkpoints store one tensor per expert (Qwen's
``mlp.experts.{e}.{gate,up,down}_proj``, Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2``),
stacked over the experts at load (``weight_map.Experts``).

Every layer must be sparse: a Qwen-MoE config with dense layers (``mlp_only_layers``, or
``decoder_sparse_step`` above 1) or a sliding window is refused (UnsupportedArchitectureError)."""
from __future__ import annotations

import dataclasses

from ..family import Family
from ..layers.moe import MoeCausalLM
from ..registry import UnsupportedArchitectureError
from ..spec import ModelSpec, config_int
from ..weight_map import Experts, Fused, Part, Path, Source, Tensor, linear
from .llama import LAYER
from .llama import weight_map as llama_weight_map


def _attention_and_norms(spec: ModelSpec) -> dict[Path, Source]:
    """Llama's map without its MLP."""
    return {path: source for path, source in llama_weight_map(spec).items() if path[:2] != ('layers', 'mlp')}


def _experts(spec: ModelSpec, router: str, prefix: str, gate: str, up: str, down: str) -> dict[Path, Source]:
    """The router ``router`` and expert ``e``'s ``prefix + '{e}.' + gate/up/down`` weights."""
    expert = prefix + '{e}.'
    return {
        ('layers', 'mlp', 'router', 'w'): Tensor(router),
        ('layers', 'mlp', 'experts', 'gate_up'): Experts(Fused((Part(f'{expert}{gate}.weight'),
                                                                Part(f'{expert}{up}.weight'))), spec.num_experts),
        ('layers', 'mlp', 'experts', 'down'): Experts(Tensor(f'{expert}{down}.weight'), spec.num_experts),
    }


def qwen_weight_map(spec: ModelSpec) -> dict[Path, Source]:
    """Qwen2-MoE's and Qwen3-MoE's names (the shared expert where the spec has one)."""
    mlp = LAYER + 'mlp.'
    shared = {
        **linear(('layers', 'mlp', 'shared_gate_up'), (mlp + 'shared_expert.gate_proj', mlp + 'shared_expert.up_proj')),
        **linear(('layers', 'mlp', 'shared_down'), mlp + 'shared_expert.down_proj'),
        **linear(('layers', 'mlp', 'shared_expert_gate'), mlp + 'shared_expert_gate'),
    } if spec.shared_expert_size else {}
    experts = _experts(spec, mlp + 'gate.weight', mlp + 'experts.', 'gate_proj', 'up_proj', 'down_proj')
    return {**_attention_and_norms(spec), **experts, **shared}


def mixtral_weight_map(spec: ModelSpec) -> dict[Path, Source]:
    moe = LAYER + 'block_sparse_moe.'
    return {**_attention_and_norms(spec), **_experts(spec, moe + 'gate.weight', moe + 'experts.', 'w1', 'w3', 'w2')}


def _moe_fields(spec: ModelSpec, config: dict, path: str, expert_size_key: str | None,
                norm_topk_prob: bool) -> ModelSpec:
    """The expert count (``num_experts``, as Qwen's published configs name it, or
    ``num_local_experts``, as Mixtral's and transformers 5's), top-k and width."""
    experts_key = 'num_experts' if config.get('num_experts') is not None else 'num_local_experts'
    return dataclasses.replace(
        spec, num_experts=config_int(config, experts_key, path),
        experts_per_token=config_int(config, 'num_experts_per_tok', path),
        intermediate_size=config_int(config, expert_size_key, path) if expert_size_key else spec.intermediate_size,
        norm_topk_prob=norm_topk_prob)


def _qwen_spec(shared: bool):
    """``adjust_spec`` of a Qwen MoE family: the expert fields; refuses dense layers and windows."""
    def adjust(spec: ModelSpec, config: dict, path: str) -> ModelSpec:
        if config.get('mlp_only_layers') or config.get('decoder_sparse_step', 1) != 1:
            raise UnsupportedArchitectureError(
                spec.architecture, f"dense layers among the experts (mlp_only_layers={config.get('mlp_only_layers')}, "
                                   f"decoder_sparse_step={config.get('decoder_sparse_step', 1)})")
        if config.get('use_sliding_window'):
            raise UnsupportedArchitectureError(spec.architecture, 'use_sliding_window')
        spec = _moe_fields(spec, config, path, 'moe_intermediate_size',
                           bool(config.get('norm_topk_prob', False)))
        if shared:
            spec = dataclasses.replace(spec, shared_expert_size=config_int(config, 'shared_expert_intermediate_size',
                                                                            path))
        return spec
    return adjust


def _mixtral_spec(spec: ModelSpec, config: dict, path: str) -> ModelSpec:
    return _moe_fields(spec, config, path, None, True)


def _mixtral_config(config: dict) -> dict:
    """MixtralConfig's reading: no window when config.json gives none (Mistral's default is 4096)."""
    return {'sliding_window': None, **config}


FAMILIES = {
    'Qwen3MoeForCausalLM': Family(MoeCausalLM, qwen_weight_map, qk_norm=True, adjust_spec=_qwen_spec(False)),
    'Qwen2MoeForCausalLM': Family(MoeCausalLM, qwen_weight_map, adjust_spec=_qwen_spec(True)),
    'MixtralForCausalLM': Family(MoeCausalLM, mixtral_weight_map, sliding_window='all_layers',
                                 adjust_spec=_mixtral_spec, read_config=_mixtral_config),
}
