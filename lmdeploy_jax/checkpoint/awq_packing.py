"""4-bit weight packing of AutoAWQ (GEMM version) and GPTQ checkpoints, in numpy.

Both formats quantize a linear layer's weight ``W[in, out]`` (the transpose of torch's
``[out, in]``) per group of ``group_size`` consecutive input rows: ``W ~= (q - z) * s`` with integer
codes ``q`` in [0, 15], a zero point ``z`` and a scale ``s`` per (group, output column). The two
formats store the same numbers differently:

AutoAWQ GEMM (``quant_method == "awq"``, ``version == "gemm"``):
    ``qweight`` int32 ``[in, out // 8]``: eight codes of one row per int32, packed along the output
    axis, column ``8c + AWQ_ORDER[i]`` in nibble ``i`` (bits ``4i .. 4i+3``).
    ``qzeros`` int32 ``[in // g, out // 8]``: the zero points, packed the same way.
    ``scales`` float16 ``[in // g, out]``.

GPTQ (``quant_method == "gptq"``, ``desc_act`` false, AutoGPTQ's ``checkpoint_format`` "gptq"):
    ``qweight`` int32 ``[in // 8, out]``: eight codes of one column per int32, packed along the input
    axis, row ``8r + i`` in nibble ``i``.
    ``qzeros`` int32 ``[in // g, out // 8]``: ``zero - 1`` packed along the output axis in plain order
    (the off-by-one every GPTQ v1 loader undoes), so a zero point must be in [1, 15]; a symmetric
    checkpoint stores 7 (zero 8) in every nibble.
    ``scales`` float16 ``[in // g, out]``; ``g_idx`` int32 ``[in]``, ``row // g``.

Codes and zeros are uint8 arrays holding values in [0, 15]; packed words are int32 (the bit pattern
of the unsigned word). Every array returned is C-contiguous (``safetensors.numpy.save_file`` writes
an array's buffer as it lies in memory), whatever the layout of the inputs. Every function checks
shapes and ranges and raises ValueError naming the argument and the fault.
"""
from __future__ import annotations

import numpy as np

BITS = 4
PACK = 32 // BITS                      # codes per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
GPTQ_ZERO_OFFSET = 1                   # GPTQ v1 stores zero - 1


def _check_codes(name: str, values: np.ndarray, low: int = 0, high: int = 15) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f'{name} must be 2-D, got shape {values.shape}')
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f'{name} must hold integers, got dtype {values.dtype}')
    if values.size and (values.min() < low or values.max() > high):
        raise ValueError(f'{name} must hold values in [{low}, {high}], got [{values.min()}, {values.max()}]')
    return values.astype(np.uint32)


def _check_words(name: str, words: np.ndarray) -> np.ndarray:
    words = np.asarray(words)
    if words.ndim != 2 or words.dtype not in (np.int32, np.uint32):
        raise ValueError(f'{name} must be a 2-D int32 array, got {words.dtype} {words.shape}')
    return words.view(np.uint32)


def _divisible(name: str, size: int, by: int) -> None:
    if size % by:
        raise ValueError(f'{name} ({size}) must be a multiple of {by}')


def pack_columns(codes: np.ndarray, order=AWQ_ORDER) -> np.ndarray:
    """uint8 codes ``[rows, cols]`` -> int32 ``[rows, cols // 8]``, nibble i of word c holding
    column ``8c + order[i]`` (``order`` AWQ_ORDER for AWQ, ``range(8)`` for GPTQ zeros)."""
    codes = _check_codes('codes', codes)
    _divisible('codes columns', codes.shape[1], PACK)
    grouped = codes.reshape(codes.shape[0], -1, PACK)[:, :, list(order)]
    shifts = np.arange(PACK, dtype=np.uint32) * BITS
    return np.ascontiguousarray(np.bitwise_or.reduce(grouped << shifts, axis=2), np.uint32).view(np.int32)


def unpack_columns(words: np.ndarray, order=AWQ_ORDER) -> np.ndarray:
    """The inverse of pack_columns: int32 ``[rows, cols // 8]`` -> uint8 ``[rows, cols]``."""
    words = _check_words('words', words)
    shifts = np.arange(PACK, dtype=np.uint32) * BITS
    nibbles = (words[:, :, None] >> shifts) & 0xF
    codes = np.empty_like(nibbles)
    codes[:, :, list(order)] = nibbles
    return np.ascontiguousarray(codes.reshape(words.shape[0], -1), np.uint8)


def pack_rows(codes: np.ndarray) -> np.ndarray:
    """uint8 codes ``[rows, cols]`` -> int32 ``[rows // 8, cols]``, nibble i of word r holding row
    ``8r + i`` (GPTQ's qweight)."""
    codes = _check_codes('codes', codes)
    _divisible('codes rows', codes.shape[0], PACK)
    return np.ascontiguousarray(pack_columns(codes.T, order=range(PACK)).T)


def unpack_rows(words: np.ndarray) -> np.ndarray:
    """The inverse of pack_rows: int32 ``[rows // 8, cols]`` -> uint8 ``[rows, cols]``."""
    return np.ascontiguousarray(unpack_columns(np.asarray(words).T, order=range(PACK)).T)


def _check_groups(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray) -> int:
    """The group size implied by ``codes[in, out]``, ``zeros`` and ``scales`` ``[in // g, out]``."""
    codes, zeros, scales = np.asarray(codes), np.asarray(zeros), np.asarray(scales)
    if codes.ndim != 2 or zeros.ndim != 2 or scales.ndim != 2:
        raise ValueError(f'codes, zeros and scales must be 2-D, got {codes.shape}, {zeros.shape}, {scales.shape}')
    if zeros.shape != scales.shape or zeros.shape[1] != codes.shape[1] or zeros.shape[0] == 0 \
            or codes.shape[0] % zeros.shape[0]:
        raise ValueError(f'zeros {zeros.shape} and scales {scales.shape} must both be [in // group_size, out] '
                         f'for codes {codes.shape}')
    return codes.shape[0] // zeros.shape[0]


def pack_awq(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray):
    """AutoAWQ GEMM tensors from codes ``[in, out]``, zeros and scales ``[in // g, out]``.

    Returns ``(qweight int32 [in, out // 8], qzeros int32 [in // g, out // 8], scales float16)``."""
    _check_groups(codes, zeros, scales)
    return pack_columns(codes), pack_columns(zeros), np.ascontiguousarray(scales, np.float16)


def unpack_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray):
    """The inverse of pack_awq: ``(codes uint8 [in, out], zeros uint8 [in // g, out], scales)``."""
    codes, zeros = unpack_columns(qweight), unpack_columns(qzeros)
    _check_groups(codes, zeros, scales)
    return codes, zeros, np.asarray(scales)


def pack_gptq(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray):
    """GPTQ (v1, desc_act false) tensors from codes ``[in, out]``, zeros and scales ``[in // g, out]``.

    Returns ``(qweight int32 [in // 8, out], qzeros int32 [in // g, out // 8], scales float16,
    g_idx int32 [in])``. ValueError when a zero point is 0, which the v1 format cannot store."""
    group = _check_groups(codes, zeros, scales)
    stored = _check_codes('zeros', zeros, low=GPTQ_ZERO_OFFSET).astype(np.int64) - GPTQ_ZERO_OFFSET
    g_idx = (np.arange(np.asarray(codes).shape[0]) // group).astype(np.int32)
    return (pack_rows(codes), pack_columns(stored, order=range(PACK)), np.ascontiguousarray(scales, np.float16),
            g_idx)


def unpack_gptq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None = None):
    """The inverse of pack_gptq: ``(codes uint8 [in, out], zeros uint8 [in // g, out], scales)``.

    ``g_idx``, when given, must be ``row // group_size`` (no act-order); ValueError otherwise."""
    codes = unpack_rows(qweight)
    zeros = unpack_columns(qzeros, order=range(PACK)).astype(np.uint8) + GPTQ_ZERO_OFFSET
    group = _check_groups(codes, zeros, scales)
    if g_idx is not None and not np.array_equal(np.asarray(g_idx), np.arange(codes.shape[0]) // group):
        raise ValueError(f'g_idx is not row // {group}: an act-order (desc_act) GPTQ checkpoint is not supported')
    return codes, zeros, np.asarray(scales)


def quantize(weight: np.ndarray, group_size: int, symmetric: bool = False):
    """Round-to-nearest 4-bit quantization of a float ``weight[in, out]`` per group of rows.

    Returns ``(codes uint8 [in, out], zeros uint8 [in // g, out], scales float16 [in // g, out])``
    with ``weight ~= (codes - zeros) * scales``. Symmetric quantization fixes every zero at 8;
    asymmetric zeros lie in [1, 15] so that both AWQ and GPTQ v1 can store them."""
    weight = np.asarray(weight, np.float32)
    if weight.ndim != 2:
        raise ValueError(f'weight must be 2-D [in, out], got {weight.shape}')
    _divisible('weight rows', weight.shape[0], group_size)
    groups = weight.reshape(-1, group_size, weight.shape[1])
    if symmetric:
        scales = np.maximum(np.abs(groups).max(axis=1) / 7.0, 1e-8)
        zeros = np.full(scales.shape, 8.0, np.float32)
    else:
        low, high = groups.min(axis=1), groups.max(axis=1)
        scales = np.maximum((high - low) / 14.0, 1e-8)
        zeros = np.clip(np.round(-low / scales) + 1, 1, 15)
    scales = scales.astype(np.float16)
    codes = np.clip(np.round(groups / scales.astype(np.float32)[:, None] + zeros[:, None]), 0, 15)
    return (np.ascontiguousarray(codes.reshape(weight.shape), np.uint8), np.ascontiguousarray(zeros, np.uint8),
            np.ascontiguousarray(scales))


def dequantize(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
    """``(codes - zeros) * scales`` per group: the float weight ``[in, out]`` the 4-bit tensors stand for."""
    group = _check_groups(codes, zeros, scales)
    codes, zeros = np.asarray(codes, np.float32), np.asarray(zeros, np.float32)
    scales = np.asarray(scales, np.float32)
    weight = (codes.reshape(-1, group, codes.shape[1]) - zeros[:, None]) * scales[:, None]
    return weight.reshape(codes.shape).astype(dtype)
