"""Folding AWQ's smoothing scales into a decoder layer (LMDeploy's ``smooth_ln_fcs`` and
``smooth_fc_fcs``, AutoAWQ's ``apply_scale``): each group's linears multiply their input channels
by ``s`` and the operation before them divides its output by ``s``, so the float layer computes
the same function and only the quantization grid moves.

- q/k/v after the input norm, gate/up after the post-attention norm: the norm's weight is
  divided (channels where it is 0 keep ``s = 1``);
- o_proj after v_proj: v_proj's output rows (and bias) are divided; only when they are o_proj's
  input channels one for one (as many KV heads as heads), as LMDeploy and AutoAWQ do;
- down_proj after up_proj: up_proj's output rows are divided.
"""
from __future__ import annotations

from .decoder_layer import GROUPS, LayerTensors
from .scale_search import smoothing_scales, weight_mean

# the norm or linear each group's scales fold into, and whether it is a norm
PREVIOUS = {'qkv': ('input_norm', True), 'gate_up': ('post_norm', True), 'o': ('v', False), 'down': ('up', False)}


def foldable_groups(t: LayerTensors) -> tuple[str, ...]:
    """The groups of ``GROUPS`` whose scales can be folded in this layer (o_proj only when
    v_proj's output is o_proj's input channel for channel)."""
    return tuple(g for g in GROUPS if g != 'o' or t['v'].shape[0] == t['o'].shape[1])


def smooth_layer(t: LayerTensors, activations: dict, ratios: dict, group_size: int) -> tuple[LayerTensors, dict]:
    """``(t smoothed, the scales by group)``: each group of ``ratios`` smoothed by ``s =
    smoothing_scales(activations[group], weight_mean(linears), ratios[group])`` multiplied into
    the group's linears' columns and divided out of the operation before them (``PREVIOUS``).
    ``activations[group]`` is the per-channel statistic of the group's input (``[in]``, float32)."""
    t, scales = dict(t), {}
    for group, ratio in ratios.items():
        linears, _ = GROUPS[group]
        previous, is_norm = PREVIOUS[group]
        keep = t[previous] == 0 if is_norm else None
        s = smoothing_scales(activations[group], weight_mean([t[n] for n in linears], group_size), ratio, keep)
        for name in linears:
            t[name] = t[name] * s
        t[previous] = t[previous] / (s if is_norm else s[:, None])
        if not is_norm and f'{previous}_bias' in t:
            t[f'{previous}_bias'] = t[f'{previous}_bias'] / s
        scales[group] = s
    return t, scales


def linear_names() -> tuple[str, ...]:
    """Every quantized linear's short name, in layer order."""
    return tuple(n for linears, _ in GROUPS.values() for n in linears)

