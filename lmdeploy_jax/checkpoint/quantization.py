"""Refusing quantized checkpoints by name, until quantized weights can be loaded.

A checkpoint quantized by AWQ, GPTQ, FP8, bitsandbytes, compressed-tensors, ... says so with a
``quantization_config`` object in config.json, and stores its linear weights under other names and
dtypes (``qweight``/``qzeros``/``scales``, float8 ``weight`` with ``weight_scale_inv``, ...). Neither
backend loads those: the JAX engine would miss ``q_proj.weight``, and transformers needs the
method's own kernels and packages. So both refuse it first, naming the method. A GGUF file is not
refused: it is dequantized into a float32 directory whose config.json has no ``quantization_config``.
"""
from __future__ import annotations

from .errors import CheckpointError

QUANTIZATION_FIELD = 'quantization_config'


class UnsupportedQuantizationError(ValueError):
    """The checkpoint at ``path`` (its config.json) is quantized by ``method``, which no backend runs
    yet."""

    def __init__(self, path: str, method: str):
        self.path, self.method = path, method
        super().__init__(f"{path}: quantization method {method!r} is not supported yet: neither the JAX engine "
                         'nor the pytorch backend loads quantized weights; use the unquantized (float16, '
                         'bfloat16 or float32) checkpoint, or a GGUF file (which is dequantized on loading)')


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


def check_not_quantized(config_path: str, config: dict) -> None:
    """UnsupportedQuantizationError naming the method when the checkpoint is quantized."""
    method = quantization_method(config_path, config)
    if method is not None:
        raise UnsupportedQuantizationError(config_path, method)
