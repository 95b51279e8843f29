"""AWQ GEMM and GPTQ 4-bit packing (lmdeploy_jax/checkpoint/awq_packing.py) on fresh random codes:
round trips, and the bit positions other loaders read (vLLM's AWQ shifts, GPTQ's plain nibbles with
the v1 zero offset)."""
import numpy as np
import pytest

from lmdeploy_jax.checkpoint import awq_packing as ap

AWQ_SHIFTS = np.array([0, 16, 4, 20, 8, 24, 12, 28], np.uint32)   # column j of a word sits at bit AWQ_SHIFTS[j]


def random_tensors(rng, rows, cols, group, low_zero=0):
    codes = rng.integers(0, 16, (rows, cols), dtype=np.uint8)
    zeros = rng.integers(low_zero, 16, (rows // group, cols), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, (rows // group, cols)).astype(np.float16)
    return codes, zeros, scales


@pytest.mark.parametrize('rows,cols,group', [(128, 24, 64), (384, 16, 128), (192, 40, 64)])
def test_awq_round_trip_and_bit_layout(rows, cols, group):
    rng = np.random.default_rng()
    codes, zeros, scales = random_tensors(rng, rows, cols, group)
    qweight, qzeros, packed_scales = ap.pack_awq(codes, zeros, scales)
    assert qweight.dtype == np.int32 and qweight.shape == (rows, cols // 8)
    assert qzeros.shape == (rows // group, cols // 8) and packed_scales.dtype == np.float16
    words = qweight.view(np.uint32)
    independent = ((words[:, :, None] >> AWQ_SHIFTS) & 0xF).reshape(rows, cols)
    np.testing.assert_array_equal(independent, codes)
    back = ap.unpack_awq(qweight, qzeros, packed_scales)
    np.testing.assert_array_equal(back[0], codes)
    np.testing.assert_array_equal(back[1], zeros)
    np.testing.assert_array_equal(back[2], scales)


@pytest.mark.parametrize('rows,cols,group', [(128, 16, 64), (256, 24, 128)])
def test_gptq_round_trip_and_bit_layout(rows, cols, group):
    rng = np.random.default_rng()
    codes, zeros, scales = random_tensors(rng, rows, cols, group, low_zero=1)
    qweight, qzeros, _, g_idx = ap.pack_gptq(codes, zeros, scales)
    assert qweight.shape == (rows // 8, cols) and qzeros.shape == (rows // group, cols // 8)
    shifts = np.arange(8, dtype=np.uint32) * 4
    rows_back = (qweight.view(np.uint32)[:, None, :] >> shifts[None, :, None]) & 0xF
    np.testing.assert_array_equal(rows_back.reshape(rows, cols), codes)
    stored = ((qzeros.view(np.uint32)[:, :, None] >> shifts) & 0xF).reshape(zeros.shape)
    np.testing.assert_array_equal(stored + 1, zeros)
    np.testing.assert_array_equal(g_idx, np.arange(rows) // group)
    back_codes, back_zeros, _ = ap.unpack_gptq(qweight, qzeros, scales, g_idx)
    np.testing.assert_array_equal(back_codes, codes)
    np.testing.assert_array_equal(back_zeros, zeros)


def test_a_transposed_weight_packs_into_contiguous_arrays(tmp_path):
    """A torch ``[out, in]`` weight is quantized as its transpose; the packed arrays saved by
    safetensors' numpy writer (which writes the buffer as it lies) load back equal."""
    from safetensors.numpy import load_file, save_file
    weight = np.random.default_rng().standard_normal((64, 128)).astype(np.float32)
    for method, pack in (('awq', ap.pack_awq), ('gptq', ap.pack_gptq)):
        arrays = dict(zip('abcd', pack(*ap.quantize(weight.T, 64))))
        assert all(a.flags['C_CONTIGUOUS'] for a in arrays.values()), method
        save_file(arrays, str(tmp_path / f'{method}.safetensors'))
        for name, back in load_file(str(tmp_path / f'{method}.safetensors')).items():
            np.testing.assert_array_equal(back, arrays[name])


def test_symmetric_gptq_stores_sevens():
    weight = np.random.default_rng().standard_normal((128, 8)).astype(np.float32)
    codes, zeros, scales = ap.quantize(weight, 64, symmetric=True)
    qzeros = ap.pack_gptq(codes, zeros, scales)[1]
    assert (qzeros.view(np.uint32) == 0x77777777).all()


@pytest.mark.parametrize('symmetric', [False, True])
def test_quantize_dequantize_error_within_half_a_step(symmetric):
    weight = np.random.default_rng().standard_normal((256, 32)).astype(np.float32)
    codes, zeros, scales = ap.quantize(weight, 128, symmetric=symmetric)
    error = np.abs(ap.dequantize(codes, zeros, scales) - weight).reshape(2, 128, 32)
    assert (error <= scales.astype(np.float32)[:, None] * 0.5 + 1e-3).all()


def test_bad_inputs_are_named():
    rng = np.random.default_rng()
    codes, zeros, scales = random_tensors(rng, 128, 16, 64)
    with pytest.raises(ValueError, match='codes must hold values in'):
        ap.pack_awq(codes.astype(np.int32) + 16, zeros, scales)
    with pytest.raises(ValueError, match='zeros .* and scales'):
        ap.pack_awq(codes, zeros[:1], scales)
    with pytest.raises(ValueError, match='zeros must hold values in \\[1, 15\\]'):
        ap.pack_gptq(codes, np.zeros_like(zeros), scales)
    qweight, qzeros, s, g_idx = ap.pack_gptq(codes, zeros + (zeros == 0), scales)
    with pytest.raises(ValueError, match='act-order'):
        ap.unpack_gptq(qweight, qzeros, s, g_idx[::-1])
