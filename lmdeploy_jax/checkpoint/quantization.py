"""Quantized checkpoints: which the JAX engine loads (4-bit AWQ and GPTQ, W4A16), which are refused
by name, and reading their packed tensors into the device layout of ``pallas_kernels.w4a16``.

A checkpoint quantized by AWQ, GPTQ, FP8, bitsandbytes, compressed-tensors, ... says so with a
``quantization_config`` object in config.json, and stores its linear weights under other names and
dtypes (``qweight``/``qzeros``/``scales``, float8 ``weight`` with ``weight_scale_inv``, ...). The JAX
engine loads AutoAWQ's GEMM layout (``quant_method == "awq"``) and GPTQ's (``"gptq"``, no
act-order), 4 bits, keeping the codes packed on the device; every other method, and AWQ/GPTQ
settings it cannot run, are refused naming the method or the setting. The pytorch backend loads
none (transformers needs the methods' own kernels and packages). A GGUF file is not refused: it is
dequantized into a float32 directory whose config.json has no ``quantization_config``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pallas_kernels.w4a16.layout import pack_codes

from . import awq_packing
from .errors import CheckpointError

QUANTIZATION_FIELD = 'quantization_config'
JAX_METHODS = ('awq', 'gptq')             # the methods the JAX engine loads
MODEL_FORMATS = ('hf', 'awq', 'gptq')     # TurbomindEngineConfig.model_format's values (None: read it)


class UnsupportedQuantizationError(ValueError):
    """The checkpoint at ``path`` (its config.json) is quantized by ``method``, which the asked-for
    backend cannot run (``reason`` says why and what can)."""

    def __init__(self, path: str, method: str, reason: str | None = None):
        self.path, self.method = path, method
        reason = reason or (f"the JAX engine (backend='turbomind') loads only {' and '.join(JAX_METHODS)} 4-bit "
                            'checkpoints and the pytorch backend no quantized one; use the unquantized '
                            '(float16, bfloat16 or float32) checkpoint, or a GGUF file (dequantized on loading)')
        super().__init__(f'{path}: quantization method {method!r} is not supported: {reason}')


@dataclass(frozen=True)
class WeightQuantization:
    """4-bit weights of ``method`` ('awq' or 'gptq') with a scale and zero point per ``group_size``
    input rows (0: one group over all of them, GPTQ's ``group_size: -1``)."""
    method: str
    group_size: int

    def groups(self, in_features: int) -> int:
        return in_features // self.group_size if self.group_size else 1


def quantization_method(config_path: str, config: dict) -> str | None:
    """The method named by config.json's ``quantization_config`` (None when it has none).

    ``quant_method`` names it; a bitsandbytes config of older transformers names none and sets
    ``load_in_4bit`` or ``load_in_8bit`` instead. CheckpointError naming the file when the field is
    not an object, or names no method."""
    quant = config.get(QUANTIZATION_FIELD)
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise CheckpointError(config_path, f"field '{QUANTIZATION_FIELD}' must be an object, got {quant!r}")
    method = quant.get('quant_method')
    if method is None and (quant.get('load_in_4bit') or quant.get('load_in_8bit')):
        return 'bitsandbytes'
    if not isinstance(method, str) or not method:
        raise CheckpointError(config_path, f"field '{QUANTIZATION_FIELD}' names no 'quant_method' "
                                           f'(a non-empty string), got {method!r}')
    return method


def _setting(config_path: str, method: str, quant: dict, name: str, allowed: tuple, default, why: str):
    value = quant.get(name, default)
    if value not in allowed:
        raise UnsupportedQuantizationError(config_path, method, f'{QUANTIZATION_FIELD}.{name}={value!r}: {why}')
    return value


def weight_quantization(config_path: str, config: dict) -> WeightQuantization | None:
    """The 4-bit weights the JAX engine loads from this checkpoint (None: not quantized).

    UnsupportedQuantizationError naming the method for any method but AWQ and GPTQ, and naming the
    setting for AWQ/GPTQ settings it cannot run: bits other than 4, AWQ other than the GEMM
    version or without zero points, GPTQ with act-order (``desc_act``) or another
    ``checkpoint_format``, layers left unquantized (``modules_to_not_convert``), a group size that is
    not a multiple of 8 (or -1)."""
    method = quantization_method(config_path, config)
    if method is None:
        return None
    if method not in JAX_METHODS:
        raise UnsupportedQuantizationError(config_path, method)
    quant = config[QUANTIZATION_FIELD]
    check = lambda *a: _setting(config_path, method, quant, *a)  # noqa: E731
    bits = 'bits' if method == 'gptq' or 'bits' in quant else 'w_bit'
    check(bits, (4,), None, 'only 4-bit weights are loaded')
    if method == 'awq':
        check('version', ('gemm', 'GEMM'), 'gemm', "only AutoAWQ's GEMM packing is loaded")
        check('zero_point', (True,), True, 'AWQ weights without zero points are not loaded')
    else:
        check('desc_act', (False, None), False, 'act-order (desc_act) GPTQ checkpoints are not supported; '
                                                'quantize with desc_act=False')
        check('checkpoint_format', ('gptq',), 'gptq', "only GPTQ's v1 'gptq' format is loaded")
    check('modules_to_not_convert', (None, []), None, 'layers left unquantized are not loaded')
    group = quant.get('group_size', quant.get('q_group_size'))
    if not (group == -1 or (isinstance(group, int) and group > 0 and group % 8 == 0)):
        raise UnsupportedQuantizationError(config_path, method, f'{QUANTIZATION_FIELD}.group_size={group!r}: '
                                           'groups of a multiple of 8 rows (or -1) are loaded')
    return WeightQuantization(method, 0 if group == -1 else group)


def check_model_format(model_format: str | None, config_path: str, config: dict) -> None:
    """``TurbomindEngineConfig.model_format`` against the checkpoint: None accepts what it is;
    'hf' wants unquantized weights, 'awq'/'gptq' that method. ValueError naming both otherwise."""
    if model_format is None:
        return
    method = quantization_method(config_path, config) or 'hf'
    if model_format != method:
        raise ValueError(f'model_format={model_format!r} does not match the checkpoint: {config_path} holds '
                         f"{'unquantized (hf)' if method == 'hf' else repr(method)} weights")


def check_not_quantized(config_path: str, config: dict) -> None:
    """UnsupportedQuantizationError naming the method when the checkpoint is quantized: for the
    pytorch backend, which loads no quantized weights."""
    method = quantization_method(config_path, config)
    if method is not None:
        reason = ("the pytorch backend loads no quantized weights; the JAX engine (backend='turbomind') loads "
                  f"{' and '.join(JAX_METHODS)} 4-bit checkpoints") if method in JAX_METHODS else None
        raise UnsupportedQuantizationError(config_path, method, reason)


# --- the tensors: checkpoint names and shapes, and the device layout --------------------------------

def checkpoint_shapes(method: str, module: str, leaf: str, rows: int, columns: int) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors (name -> shape) of ``module`` (``'model.layers.0.self_attn.o_proj'``)
    that the device array ``leaf`` ('qweight', 'scales' or 'zeros') of ``rows`` (``in // 8`` or
    the groups) and ``columns`` (the module's outputs) is read from."""
    if leaf == 'qweight':
        return {f'{module}.qweight': (rows * 8, columns // 8) if method == 'awq' else (rows, columns)}
    if leaf == 'zeros':
        return {f'{module}.qzeros': (rows, columns // 8)}
    return {f'{module}.scales': (rows, columns)}


def device_array(method: str, read, module: str, leaf: str) -> np.ndarray:
    """The device array ``leaf`` of ``module`` from its checkpoint tensors (``read(name)`` -> array):
    ``qweight`` int32 ``[K // 8, N]`` in ``pallas_kernels.w4a16.layout``'s tile layout, ``scales``
    float16 ``[groups, N]``, ``zeros`` float16 ``[groups, N]`` (the integer zero points)."""
    if leaf == 'scales':
        return np.asarray(read(f'{module}.scales'), np.float16)
    if leaf == 'zeros':
        qzeros = _packed(read, f'{module}.qzeros')
        if method == 'awq':
            return awq_packing.unpack_columns(qzeros).astype(np.float16)
        zeros = awq_packing.unpack_columns(qzeros, order=range(awq_packing.PACK))
        return zeros.astype(np.float16) + np.float16(awq_packing.GPTQ_ZERO_OFFSET)
    qweight = _packed(read, f'{module}.qweight')
    codes = awq_packing.unpack_columns(qweight) if method == 'awq' else awq_packing.unpack_rows(qweight)
    return pack_codes(codes)


def _packed(read, name: str) -> np.ndarray:
    words = np.asarray(read(name))
    if words.dtype != np.int32:
        raise ValueError(f'tensor {name!r} must hold int32 packed 4-bit codes, got {words.dtype}')
    return words
