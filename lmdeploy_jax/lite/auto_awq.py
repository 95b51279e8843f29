"""``lmdeploy_jax lite auto_awq``: LMDeploy's ``auto_awq`` in JAX. A Hugging Face Llama-family
model's decoder linears are quantized to 4 bits (asymmetric, group-wise) after activation-aware
smoothing, one decoder layer at a time, and written as a standard AutoAWQ GEMM checkpoint.

Per layer (weights read from the memory-mapped safetensors, so only one layer is on the device):
the calibration tokens' hidden states go through the float layer, giving the per-channel
statistics of each linear group's input (``decoder_layer.GROUPS``); the smoothing scales
``|x|**r / w_mean**(1 - r)`` are folded into the layer (``smoothing``) with ``r = 0.5`` and
``|x|`` the channel's maximum (LMDeploy's default), or with ``|x|`` its mean and ``r`` searched
per group for the least output error of the quantized block (``--search-scale``,
``scale_search``), which then also searches each group's clipping range of the smoothed weights
but q/k's (AutoAWQ's ``auto_clip``, ``clip_search``); the smoothed linears are quantized and
written; the float layer's output feeds the next layer. ``calib_samples=0`` quantizes without
smoothing (LMDeploy's data-free mode).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ..checkpoint.source import resolve_model
from ..models.registry import family
from ..models.safetensors_file import SafetensorsCheckpoint
from ..models.spec import ModelSpec, spec_from_config
from .awq_checkpoint import AwqCheckpointWriter, write_model_files
from .calibration import calibration_text, calibration_tokens
from .clip_search import clip_ranges, clip_weight, sample_tokens
from .decoder_layer import GROUPS, SEARCH_INPUTS, DecoderLayer, window_tensor
from .hf_layers import ARCHITECTURES, EMBED, FLOAT_TENSORS, LINEARS, layer_prefix, other_tensor_names, read_layer
from .scale_search import DEFAULT_RATIO, RatioSearch, quantize
from .smoothing import foldable_groups, linear_names, smooth_layer

W_BITS = (4,)
DTYPES = ('auto', 'float16', 'bfloat16')
PACK = 8                     # AutoAWQ packs eight 4-bit codes of consecutive output columns per int32
CLIPPED = ('v', 'o', 'gate', 'up', 'down')      # AutoAWQ leaves q and k unclipped (attention scores)


def auto_awq(model: str | None, work_dir: str = './work_dir', calib_dataset: str = 'wikitext2',
             calib_samples: int = 128, batch_size: int = 1, calib_seqlen: int = 2048, w_bits: int = 4,
             w_sym: bool = False, w_group_size: int = 128, search_scale: bool = False, dtype: str = 'auto') -> str:
    """Quantize ``model`` (a Hugging Face directory or hub id; None: the default model) into the
    new directory ``work_dir`` (absent or empty) and return its path. Arguments as LMDeploy's
    ``auto_awq``; ``calib_dataset`` is also a local text file; ``dtype`` is that of the
    checkpoint's unquantized tensors ('auto': float16, or bfloat16 for a bfloat16 model), the
    calibration itself runs in float32. ValueError naming the flag for an unsupported or invalid
    value (``w_bits`` other than 4, ``w_sym``, a group size that does not divide a linear's input
    width), an architecture other than ``hf_layers.ARCHITECTURES``, or an already quantized model."""
    _check_arguments(work_dir, calib_samples, batch_size, calib_seqlen, w_bits, w_sym, w_group_size, dtype)
    source = resolve_model(model)
    if source.is_engine_checkpoint:
        raise ValueError(f'model {source.given!r} is an engine checkpoint; pass the Hugging Face directory')
    config = source.config_dict()
    if 'quantization_config' in config:
        raise ValueError(f"model {source.given!r} is already quantized "
                         f"({config['quantization_config'].get('quant_method')!r})")
    if source.architecture not in ARCHITECTURES:
        raise ValueError(f'model {source.given!r}: architecture {source.architecture!r} is not supported by '
                         f'lite auto_awq (supported: {", ".join(ARCHITECTURES)})')
    spec = spec_from_config(config, family(source.architecture), source.architecture, jnp.float32, (),
                            source.config_path)
    _check_widths(spec, w_group_size)
    dst = os.path.abspath(os.path.expanduser(work_dir))
    with SafetensorsCheckpoint(source.hf_dir) as ckpt:
        dtype_name = _output_dtype(dtype, ckpt.dtype_name(EMBED))
        hidden = _calibration_hidden(source.hf_dir, ckpt, calib_dataset, calib_samples, calib_seqlen, batch_size)
        os.makedirs(dst, exist_ok=True)
        writer = AwqCheckpointWriter(dst, jnp.dtype(dtype_name))
        layer = DecoderLayer(spec, calib_seqlen)
        searches = _searches(layer, w_bits, w_group_size) if search_scale else None
        for i in tqdm(range(spec.num_layers), desc='auto_awq', unit='layer'):
            t = {**read_layer(ckpt, i), 'window': window_tensor(spec, i)}
            if hidden:
                t, hidden = _smooth(layer, t, hidden, searches, w_bits, w_group_size)
            _write_layer(writer, i, t, w_bits, w_group_size)
        for name in other_tensor_names(ckpt, spec.num_layers):
            writer.add(name, ckpt.view(name))
        writer.finish()
    write_model_files(source.hf_dir, dst, config, dtype_name, w_bits, w_group_size)
    return dst


def _check_arguments(work_dir, calib_samples, batch_size, calib_seqlen, w_bits, w_sym, w_group_size, dtype) -> None:
    if w_bits not in W_BITS:
        raise ValueError(f'--w-bits {w_bits} is not supported (AWQ GEMM checkpoints are 4-bit)')
    if w_sym:
        raise ValueError('--w-sym is not supported: AWQ GEMM checkpoints are asymmetric (zero_point true)')
    for flag, value, least in (('--w-group-size', w_group_size, 1), ('--calib-samples', calib_samples, 0),
                               ('--batch-size', batch_size, 1), ('--calib-seqlen', calib_seqlen, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f'{flag} must be an integer >= {least}, got {value!r}')
    if dtype not in DTYPES:
        raise ValueError(f'--dtype {dtype!r} is not one of {", ".join(DTYPES)}')
    path = os.path.abspath(os.path.expanduser(work_dir))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f'--work-dir {work_dir!r} exists and is not an empty directory')


def _check_widths(spec: ModelSpec, group_size: int) -> None:
    """ValueError naming --w-group-size unless it divides every linear's input width; AutoAWQ's
    packing also needs every output width to be a multiple of 8 (ValueError naming the model)."""
    attention = spec.num_heads * spec.head_dim
    inputs = {'q/k/v/gate/up_proj': spec.hidden_size, 'o_proj': attention, 'down_proj': spec.intermediate_size}
    for what, width in inputs.items():
        if width % group_size:
            raise ValueError(f'--w-group-size {group_size} does not divide the input width {width} of {what} '
                             f'(choose a divisor of {", ".join(map(str, sorted(set(inputs.values()))))})')
    outputs = (spec.hidden_size, attention, spec.num_kv_heads * spec.head_dim, spec.intermediate_size)
    if any(width % PACK for width in outputs):
        raise ValueError(f'a linear output width of {outputs} is not a multiple of {PACK}, which AWQ packing needs')


def _output_dtype(dtype: str, stored: str) -> str:
    """LMDeploy's rule for 'auto': bfloat16 models stay bfloat16, others become float16."""
    if dtype != 'auto':
        return dtype
    return 'bfloat16' if stored == 'bfloat16' else 'float16'


def _calibration_hidden(hf_dir: str, ckpt: SafetensorsCheckpoint, dataset: str, samples: int, seqlen: int,
                        batch_size: int) -> list[jax.Array]:
    """The calibration tokens' embeddings, float32 ``[batch, seqlen, hidden]`` batches of
    ``batch_size`` samples (the last may be smaller); none when ``samples`` is 0."""
    if not samples:
        return []
    from transformers import AutoTokenizer
    token_ids = AutoTokenizer.from_pretrained(hf_dir)(calibration_text(dataset))['input_ids']
    tokens = calibration_tokens(token_ids, samples, seqlen)
    embed = ckpt.view(EMBED)
    return [jnp.asarray(np.asarray(embed[tokens[b:b + batch_size]], np.float32))
            for b in range(0, samples, batch_size)]


def _searches(layer: DecoderLayer, bits: int, group_size: int) -> dict[str, RatioSearch]:
    """Each group's search, the block it measures as AutoAWQ's ``module2inspect``: the attention
    for q/k/v, the MLP for gate/up, the linear alone for o_proj and down_proj."""
    return {'qkv': RatioSearch(layer.qkv_block, bits, group_size),
            'o': RatioSearch(layer.linear_block, bits, group_size),
            'gate_up': RatioSearch(layer.gate_up_block, bits, group_size),
            'down': RatioSearch(layer.linear_block, bits, group_size, feed=layer.down_input)}


def _smooth(layer: DecoderLayer, t: dict, hidden: list[jax.Array], searches: dict | None, bits: int,
            group_size: int) -> tuple[dict, list[jax.Array]]:
    """``t`` smoothed from the statistics of ``hidden`` (the layer's input batches) and the layer's
    float output batches. With ``searches`` (``--search-scale``) each group's ratio is searched
    against the mean ``|x|`` and the smoothed weights' clipping ranges are searched too
    (``clip_search``), else the ratio is ``DEFAULT_RATIO`` against the max."""
    passes = [layer.forward(t, h) for h in hidden]
    groups = foldable_groups(t)
    if searches is None:
        activations = {g: jnp.max(jnp.stack([p.abs_max[g] for p in passes]), axis=0) for g in groups}
        smoothed, _ = smooth_layer(t, activations, dict.fromkeys(groups, DEFAULT_RATIO), group_size)
    else:
        tokens = sum(h.shape[0] * h.shape[1] for h in hidden)
        activations = {g: sum(p.abs_sum[g] for p in passes) / tokens for g in groups}
        ratios = {g: searches[g]([t[n] for n in GROUPS[g][0]], t, [p.inputs[SEARCH_INPUTS[g]] for p in passes],
                                 activations[g]) for g in groups}
        smoothed, scales = smooth_layer(t, activations, ratios, group_size)
        smoothed = _clip(layer, t, smoothed, scales, passes, bits, group_size)
    return smoothed, [p.out for p in passes]


def _clip(layer: DecoderLayer, t: dict, smoothed: dict, scales: dict, passes: list, bits: int,
          group_size: int) -> dict:
    """``smoothed`` with the weights of ``CLIPPED`` clipped to their searched ranges, each read
    by sampled tokens of its input as the smoothed layer sees it (divided by its group's scales)."""
    samples = {name: sample_tokens([p.inputs[name] for p in passes]) for name in ('attn_in', 'o_in', 'mlp_in')}
    samples['down_in'] = layer.down_input(t, samples['mlp_in'])
    smoothed = dict(smoothed)
    for group, (linears, source) in GROUPS.items():
        x = samples[source] / scales[group] if group in scales else samples[source]
        for name in linears:
            if name in CLIPPED:
                smoothed[name] = clip_weight(smoothed[name], clip_ranges(smoothed[name], x, bits, group_size))
    return smoothed


def _write_layer(writer: AwqCheckpointWriter, index: int, t: dict, bits: int, group_size: int) -> None:
    prefix = layer_prefix(index)
    for name in linear_names():
        codes, scales, zeros = quantize(t[name], bits, group_size, jnp.float16)
        writer.add_quantized(prefix + LINEARS[name], np.asarray(codes), np.asarray(zeros), np.asarray(scales))
    for name, tensor in FLOAT_TENSORS.items():
        if name in t:
            writer.add(prefix + tensor, np.asarray(t[name]))
